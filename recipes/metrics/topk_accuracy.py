"""Top-k accuracy as a local `evaluate` metric: `evaluate.load("recipes/metrics/topk_accuracy.py")`.

Loads offline (no hub): the module is this file. `predictions` are class indices ranked best first
(one row per example, at least max(k) columns or all the classes), `references` the true classes:

    metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0], k=[1, 5])
    -> {"top1": 0.5, "top5": 1.0}

A k larger than a row's length counts the whole row, so with fewer than k classes top-k is 1.0.
"""
import datasets
import evaluate
import numpy


class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of examples whose true class is among the k best-ranked predictions.",
            citation="",
            inputs_description="predictions: ranked class indices per example; references: true class; k: list of int",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ranked = numpy.asarray(predictions, dtype=numpy.int64)
        truth = numpy.asarray(references, dtype=numpy.int64)
        if ranked.ndim != 2 or len(ranked) != len(truth):
            raise ValueError(
                f"predictions must be ranked class indices, one row per reference; got shape {ranked.shape}"
            )
        hits = ranked == truth[:, None]
        result = {}
        for top in k:
            if int(top) < 1:
                raise ValueError(f"k must be >= 1, got {top}")
            result[f"top{int(top)}"] = float(hits[:, : int(top)].any(axis=1).mean()) if len(truth) else 0.0
        return result
