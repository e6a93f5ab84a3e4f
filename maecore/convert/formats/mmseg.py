"""mmsegmentation's MAE backbone (BEiT layers: ``layers.i.{ln1,attn,ln2,ffn}``, layer scale
``gamma_1/2``, relative position bias tables) in ``{'state_dict': …, 'meta': …}``, which
``MAE.init_weights`` unwraps.  Read back from a whole UperNet checkpoint (``backbone.`` prefix, heads
dropped)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maecore.checkpoint import save_atomic
from maecore.convert.formats import Canonical, Format, State
from maecore.convert.formats._shared import BEIT_EXTRAS, DENSE_WHY, beit_new_keys
from maecore.convert.keys import Arch

_SUB = [("norm1", "ln1"), ("norm2", "ln2"), ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
        ("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2")]
_NAMING = re.compile(r"(backbone\.)?(layers\.\d+\.ln1|patch_embed\.projection)")


def _mmseg_key(k: str) -> str:
    if k.startswith("patch_embed.proj."):
        return "patch_embed.projection." + k.split(".")[-1]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
    if not m:
        return k
    sub = m.group(2)
    for ours, theirs in _SUB:
        if sub == ours or sub.startswith(ours + "."):
            sub = theirs + sub[len(ours):]
            break
    return f"layers.{m.group(1)}.{sub}"


def _from_canonical(state: State, arch: Arch) -> tuple[State, dict[str, str]]:
    return {_mmseg_key(k): v for k, v in state.items()}, {k: _mmseg_key(k) for k in state}


def _to_canonical(state: State, config: dict[str, Any] | None) -> Canonical:
    out, dropped, renamed = {}, {}, {}
    for k, v in state.items():
        kk = k[len("backbone."):] if k.startswith("backbone.") else k
        if kk.startswith(("decode_head.", "auxiliary_head.", "neck.")):
            dropped[k] = "mmseg decode/auxiliary head or neck (not part of the ViT)"
            continue
        if kk.endswith("relative_position_index"):
            dropped[k] = "index buffer (rebuilt from the grid)"
            continue
        if kk.startswith("patch_embed.projection."):
            new = "patch_embed.proj." + kk.split(".")[-1]
        elif kk.startswith("layers."):
            i, sub = kk.split(".", 2)[1:]
            for ours, theirs in _SUB:
                if sub == theirs or sub.startswith(theirs + "."):
                    sub = ours + sub[len(theirs):]
                    break
            new = f"blocks.{i}.{sub}"
        elif kk.startswith("ln1."):  # final_norm=True stores the final norm as ln1
            new = "norm." + kk.split(".")[-1]
        else:
            new = kk
        out[new] = v
        if new != k:
            renamed[k] = new
    return Canonical(out, dropped, renamed, {})


def _detect(keys: Sequence[str]) -> bool:
    return any(_NAMING.match(k) for k in keys)


def _write(conv, source, dst: Path, force: bool) -> list[Path]:
    save_atomic({"state_dict": conv.state, "meta": {"converter": "tools/convert.py", "source": source.path}}, dst)
    return [dst]


FORMATS = (
    Format("mmseg", order=6, source_order=7, detect=_detect, to_canonical=_to_canonical, keep=frozenset({"cls_token"}),
           extras=BEIT_EXTRAS, why=DENSE_WHY, from_canonical=_from_canonical,
           new_keys=lambda job, written: beit_new_keys(job, written, "layers.{}.", "attn.relative_position_bias_table",
                                                       ("gamma_1", "gamma_2")),
           write=_write),
)
