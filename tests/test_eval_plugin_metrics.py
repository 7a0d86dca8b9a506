"""``metareason_on_eval_samples`` may return metrics: they join ``evaluate``'s metrics, the
metrics ``metareason_on_eval`` sees, ``metrics.jsonl`` and ``report.md``; bad ones are errors
naming the plugin."""
import json

import pytest

from metareason import Kernel, hookimpl
from metareason.plugin_manager import PluginError
from tests.conftest import TINY_LLAMA


def tiny(tmp_path, max_steps=1):
    return {
        "name": "m", "output_dir": str(tmp_path / "runs"), "plugins": [], "quiet": True,
        "model": {"arch": dict(TINY_LLAMA), "tokenizer": {"type": "char"}},
        "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 8, "params": {"levels": [1]}}],
                 "eval": [{"task": "causal_loop", "num_samples": 3, "seed": 9, "params": {"levels": [1]}}]},
        "generation": {"max_new_tokens": 4, "batch_size": 8},
        "train": {"max_steps": max_steps, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0,
                  "save_every": 100, "log_every": 1, "keep_last": 1},
    }


class CompletionLength:
    """Mean characters per completion, from the samples; ``seen`` records what ``on_eval`` got."""

    def __init__(self, returned=None):
        self.returned, self.seen = returned, None

    @hookimpl
    def metareason_on_eval_samples(self, samples):
        if self.returned is not None:
            return self.returned
        return {"lenplug/chars": sum(len(s["completion"]) for s in samples) / len(samples),
                "eval/lenplug/n": len(samples)}

    @hookimpl
    def metareason_on_eval(self, metrics):
        self.seen = dict(metrics)


def test_returned_metrics_reach_evaluate_on_eval_metrics_jsonl_and_the_report(tmp_path):
    kernel = Kernel(tiny(tmp_path))
    plugin = CompletionLength()
    kernel.register(plugin, name="lenplug")
    metrics = kernel.run()
    samples = [json.loads(l) for l in (tmp_path / "runs" / "m" / "eval_samples.jsonl").read_text().splitlines()]
    chars = sum(len(s["completion"]) for s in samples) / len(samples)
    assert metrics["eval/lenplug/chars"] == pytest.approx(chars)  # prefixed with eval/
    assert metrics["eval/lenplug/n"] == 3.0  # already prefixed: as returned
    assert plugin.seen["eval/lenplug/chars"] == metrics["eval/lenplug/chars"]
    rows = [json.loads(l) for l in (tmp_path / "runs" / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/lenplug/n"] for r in rows if "eval/lenplug/n" in r] == [3.0]
    report = (tmp_path / "runs" / "m" / "report.md").read_text()
    assert f"| eval/lenplug/chars | {chars:.4g} |" in report
    assert "| eval/lenplug/n | 3 |" in report


@pytest.mark.parametrize("returned, message", [
    ({"eval/accuracy": 1.0}, "metric 'eval/accuracy' is already set by the kernel"),
    ({"x": "high"}, "metric 'x' is str, expected a number"),
    ([1.0], "returned list, expected None or a dict of metrics"),
])
def test_bad_returned_metrics_are_errors_naming_the_plugin(tmp_path, returned, message):
    kernel = Kernel(tiny(tmp_path))
    kernel.register(CompletionLength(returned), name="bad")
    with pytest.raises(PluginError, match=f"plugin 'bad' hook 'metareason_on_eval_samples'.*{message}") as info:
        kernel.evaluate()
    assert info.value.plugin == "bad"


def test_two_plugins_may_not_set_the_same_metric(tmp_path):
    kernel = Kernel(tiny(tmp_path))
    kernel.register(CompletionLength({"eval/same": 1.0}), name="first")
    kernel.register(CompletionLength({"same": 2.0}), name="second")
    with pytest.raises(PluginError, match="metric 'eval/same' is already set by plugin '(first|second)'"):
        kernel.evaluate()
