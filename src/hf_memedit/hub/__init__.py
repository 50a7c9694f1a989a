"""Share an edit as a Hub model repo that says exactly what changed, and apply or revert it safely.

Formats of the shared folder (all carry `memedit_manifest.json`, the model card `README.md` and
`memedit_base.safetensors`, the base values of the changed tensors, so a revert needs no base checkpoint):

- `delta`: only the changed tensors (`memedit_edit.safetensors`) and the block selection — small.
- `full`: a complete safetensors checkpoint (+ tokenizer) that plain `AutoModel*.from_pretrained` loads.
- `peft`: the changed leaf modules as a stock PEFT `LNTuningConfig` adapter that
  `PeftModel.from_pretrained(base, repo).merge_and_unload()` applies with no hf_memedit installed.

`apply_edit`, `revert_edit` and `EditModel.from_pretrained` check a package whole against what its
manifest declares and against the model (`verify`) before they change anything; `revert_edit`
restores the base bit for bit. Edits stack: the ids of the applied edits are kept in
`model.config.memedit_chain`, each manifest records the chain it was made on, and only the top edit
can be reverted.

One module per step: `manifest` (the diff manifest), `package` (run folder → shareable folder),
`card` (the model card), `verify` (the one check of an edit against its declaration and the model),
`apply` (apply / revert), `push` (upload). Nothing here runs a job: the caller loads a base model and
passes it in.
"""

from .apply import apply_edit, chain_of, revert_edit
from .card import render_card
from .manifest import MANIFEST_NAME, ManifestError
from .package import package_edit
from .push import push_edit, push_folder


__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "apply_edit",
    "chain_of",
    "package_edit",
    "push_edit",
    "push_folder",
    "render_card",
    "revert_edit",
]
