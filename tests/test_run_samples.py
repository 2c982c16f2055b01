"""A run's periodic samples read back from its MLflow artifacts."""

from core.run_samples import SAMPLE_COLUMNS, logged_samples, samples_by_step
from core.store import connect, ensure_experiment
from core.tracking import format_samples


def test_samples_come_back_by_run_and_step_and_a_run_without_any_has_none(tmp_path, new_store):
    client = connect(new_store(tmp_path))
    experiment = ensure_experiment(client, "samples")
    first, second, silent = (client.create_run(experiment).info.run_id for _ in range(3))
    client.log_text(first, format_samples([(5, "ROMEO: a\n\nb"), (10, "ROMEO: c")]), "samples.txt")
    client.log_text(second, format_samples([(10, "JULIET: d")]), "samples.txt")
    assert logged_samples(client, first) == [(5, "ROMEO: a\n\nb"), (10, "ROMEO: c")]
    assert logged_samples(client, silent) == []
    frame = samples_by_step(client, [second, first, silent, first])
    assert list(frame.columns) == SAMPLE_COLUMNS
    assert frame.values.tolist() == [[second, 10, "JULIET: d"], [first, 5, "ROMEO: a\n\nb"], [first, 10, "ROMEO: c"]]
    assert samples_by_step(client, []).empty
