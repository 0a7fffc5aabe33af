"""The /metrics exposition: Prometheus bucket bounds are inclusive; errors count every 4xx and 5xx answer; texts
classified are counted per batch, as the model returns them."""

from __future__ import annotations

from oztune.serve.metrics import Metrics


def test_a_value_on_a_bucket_bound_counts_in_that_bucket():
    m = Metrics()
    m.on_batch(8, 0.01)  # a batch of exactly 8 texts, 10 ms: both on a bound (le means less or equal)
    text = m.render(queue_depth=0)
    assert 'oztune_batch_size_bucket{le="4"} 0' in text.splitlines()
    assert 'oztune_batch_size_bucket{le="8"} 1' in text.splitlines()
    assert 'oztune_batch_duration_seconds_bucket{le="0.005"} 0' in text.splitlines()
    assert 'oztune_batch_duration_seconds_bucket{le="0.01"} 1' in text.splitlines()


def test_errors_count_client_and_server_errors_not_successes():
    m = Metrics()
    m.on_request(200, 0.001)
    m.on_request(422, 0.001)
    assert "oztune_request_errors_total 1" in m.render(0).splitlines()  # a 4xx is an error answer too
    m.on_request(503, 0.001)
    m.on_request(413, 0.001)
    lines = m.render(0).splitlines()
    assert "oztune_request_errors_total 3" in lines and 'oztune_requests_total{status="422"} 1' in lines


def test_texts_classified_are_counted_per_batch_less_those_of_a_failed_model_call():
    m = Metrics()
    m.on_batch(5, 0.01, classified=3)  # two of its texts were in a model call that failed
    m.on_batch(2, 0.01)  # all classified
    m.on_request(200, 0.001)  # answers do not count texts: a 499's texts were classified all the same
    lines = m.render(0).splitlines()
    assert "oztune_texts_total 5" in lines and "oztune_batch_size_sum 7.0" in lines


def test_a_400_answer_counts_as_an_error():
    """Every 4xx and 5xx answer is an error of the metrics, 400 included (the other tests use 422 and 5xx)."""
    m = Metrics()
    m.on_request(200, 0.1)
    m.on_request(400, 0.1)
    assert "oztune_request_errors_total 1" in m.render(0).splitlines()
