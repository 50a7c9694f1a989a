"""kNN-LM (Appendix F): no training; a fact takes its nearest training fact's object when their contextual
embeddings are closer than ε, swept (by default over quantiles of the distances on the validation facts)."""

from dataclasses import dataclass, field

from ..grid_point import GridPoint
from ..method import Method, MethodContext


@dataclass
class KnnArguments:
    """kNN-LM's distance and ε grid (memedit compare, and memedit sweep with setting knn)."""

    _argument_group_name = "method knn (KnnArguments)"
    _unkeyed = ("knn_epsilons",)  # the grid: each point carries its own

    knn_metric: str = field(
        default="l2",
        metadata={
            "help": "kNN-LM: distance between contextual embeddings, 'l2' or 'cosine' (1 − cos).",
            "choices": ["l2", "cosine"],
        },
    )
    knn_epsilons: list[float] | None = field(
        default=None,
        metadata={
            "help": "kNN-LM: the ε swept (a fact takes its neighbour's object when closer than ε). "
            "Default: 11 quantiles of the distances on the validation facts."
        },
    )

    def __post_init__(self):
        if self.knn_metric not in ("l2", "cosine"):
            raise ValueError(f"Unknown knn_metric {self.knn_metric!r}: choose l2 or cosine.")


def points(context: MethodContext) -> list[GridPoint]:
    metric = context.arguments.knn_metric
    epsilons = context.arguments.knn_epsilons or context.runner.knn_epsilons(metric)
    return [GridPoint(metric=metric, epsilon=epsilon) for epsilon in epsilons]


METHOD = Method(name="knn", label="kNN-LM", order=120, points=points, arguments=KnnArguments)
