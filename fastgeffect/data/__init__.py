"""TOFU data: loading, templates, encoding, collation, forget/retain pairing (docs/design.md §6).

Batch format of the unlearning trainers (``collate_pairs`` of ``ForgetRetainDataset`` items)::

    {"forget": {input_ids, attention_mask, labels, index},
     "retain": {...}, "forget_idk": {...}  # the last only with refusal answers (PO, IdkDPO)}
"""
from .collate import collate_pairs, collate_qa
from .holdout import check_holdout, load_holdout
from .pairs import ForgetRetainDataset, retain_order
from .qa import QADataset, retain_pool
from .splits import author_counts, subset_tofu, write_tofu_folder
from .templates import IGNORE_INDEX, TEMPLATES, Template, encode_qa, get_template
from .tofu import HOLDOUT_OF, HUB_NAME, RETAIN_OF, SPLIT_FIELDS, load_tofu_split
from .unlearning import UnlearningData, load_unlearning_data

__all__ = [
    "collate_pairs", "collate_qa", "ForgetRetainDataset", "retain_order", "QADataset", "retain_pool",
    "author_counts", "subset_tofu", "write_tofu_folder", "IGNORE_INDEX", "TEMPLATES", "Template", "encode_qa",
    "get_template", "HUB_NAME", "RETAIN_OF", "SPLIT_FIELDS", "load_tofu_split",
    "UnlearningData", "load_unlearning_data", "check_holdout", "load_holdout", "HOLDOUT_OF",
]
