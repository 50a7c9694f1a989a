"""avg_acc: the knowledge-editing metric of Zhu et al., "Modifying Memories in Transformer Models".

An `evaluate` module over per-fact results; the arithmetic lives in `hf_memedit.evaluation.metrics.avg_acc`.
Load it offline with `evaluate.load(hf_memedit.AVG_ACC_METRIC_PATH)`.
"""

import datasets
import evaluate

from hf_memedit.evaluation.metrics import avg_acc

_DESCRIPTION = """\
A_M (accuracy on the modified facts, with their new objects), A_F\\S (accuracy on the unmodified
facts) and their mean Ā; with the before-edit results also A_F before the edit, the drop in
A_F\\S, retention, agreement and bleed; and a per-relation breakdown when relations are given.
"""

_KWARGS_DESCRIPTION = """\
Args:
    correct (`list` of `bool`): per fact, whether the model predicts its object after the edit.
    modified (`list` of `bool`): per fact, whether it is a modified fact (scored on its new object).
    correct_before (`list` of `bool`, optional): per fact, right before the edit (a modified fact
        on its original object).
    predicted, predicted_before (`list` of `list` of `int`, optional): per fact, the predicted object
        token ids after and before the edit (for agreement).
    bleeds (`list` of `bool`, optional): per fact, whether its prediction after the edit is one of the
        edit's new objects (`hf_memedit.evaluation.metrics.bleed_flags`; with correct_before: bleed).
    relations (`list` of `str`, optional): per fact, its relation id (per-relation breakdown).
    train_correct (`list` of `bool`, optional): per training phrasing of the modified facts (A_M on
        the training phrasing, i.e. reliability).
    margins_before (`list` of `float`, optional): per fact, its logit margin before the edit
        (`FactResults.margins`; with correct_before: retention_confident).
Returns:
    a_m, a_fs, avg_acc, n_modified, n_unmodified; with correct_before: a_fs_before, a_fs_drop,
    retention, n_known (retention's denominator: the unmodified facts right before), n_lost, a_f_before; with predicted(_before): agreement; with bleeds: bleed; with relations: per_relation (A_M, A_F\\S, retention and bleed of each relation), and with correct_before
    also retention_edited and n_known_edited (retention on the relations that have modified facts);
    with train_correct: a_m_train; with margins_before: retention_confident and n_known_confident (retention
    on the unmodified facts known by a margin of at least 1). Fractions in [0, 1]; None where a denominator is empty.
Examples:
    >>> metric = evaluate.load(hf_memedit.AVG_ACC_METRIC_PATH)
    >>> metric.compute(correct=[True, False, True, True], modified=[True, True, False, False])["avg_acc"]
    0.75
"""

_CITATION = """\
@article{zhu2020modifying,
  title={Modifying Memories in Transformer Models},
  author={Zhu, Chen and Rawat, Ankit Singh and Zaheer, Manzil and Bhojanapalli, Srinadh and Li, Daliang and Yu, Felix and Kumar, Sanjiv},
  journal={arXiv preprint arXiv:2012.00363},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AvgAcc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"correct": datasets.Value("bool"), "modified": datasets.Value("bool")}),
        )

    def _compute(self, correct, modified, correct_before=None, predicted=None, predicted_before=None,
                 relations=None, train_correct=None, bleeds=None, margins_before=None):
        for name, values in (("correct_before", correct_before), ("predicted", predicted), ("bleeds", bleeds),
                             ("predicted_before", predicted_before), ("relations", relations), ("margins_before", margins_before)):
            if values is not None and len(values) != len(correct):
                raise ValueError(f"{name} has {len(values)} entries for {len(correct)} facts: give one per fact.")

        def pick(values, want):
            return None if values is None else [v for v, m in zip(values, modified) if bool(m) == want]

        return avg_acc(
            pick(correct, True),
            pick(correct, False),
            modified_train_correct=train_correct,
            original_correct_before=pick(correct_before, True),
            unmodified_correct_before=pick(correct_before, False),
            unmodified_predicted=pick(predicted, False),
            unmodified_predicted_before=pick(predicted_before, False),
            unmodified_bleeds=pick(bleeds, False),
            modified_relations=pick(relations, True),
            unmodified_relations=pick(relations, False),
            unmodified_margins_before=pick(margins_before, False),
        )
