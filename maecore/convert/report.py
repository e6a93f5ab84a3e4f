"""What a conversion (or a load into a model) did, key by key."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    """What a conversion did, key by key (printed as a table by the CLI)."""

    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    added: dict[str, str] = field(default_factory=dict)  # key -> how it starts
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> written key (only where they differ)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"converted: {len(self.converted)} keys"]
        for k, why in sorted(self.dropped.items()):
            out.append(f"dropped:   {k}  ({why})")
        for k, how in sorted(self.added.items()):
            out.append(f"new:       {k}  ({how})")
        for k, (a, b) in self.resampled.items():
            out.append(f"resampled: {k}  {tuple(a)} -> {tuple(b)}")
        return out

    def table(self) -> str:
        """The report as a table, one row per group of keys (``blocks.*.attn.qkv`` stands for every block's
        weight and bias)."""
        rows: list[tuple[str, str, str]] = [("converted", f"{len(self.converted)} keys", "")]
        prefixed: dict[str, int] = defaultdict(int)
        ren: dict[tuple[str, str], int] = defaultdict(int)
        for a, b in self.renamed.items():
            if b != a and b.endswith("." + a):
                prefixed[b[: len(b) - len(a)]] += 1
            else:
                ren[(_module(a), _module(b))] += 1
        for pre, n in sorted(prefixed.items()):
            rows.append(("renamed", "*", f"-> {pre}*  ({_n_keys(n)})"))
        for (a, b), n in sorted(ren.items()):
            rows.append(("renamed", a, f"-> {b}  ({_n_keys(n)})"))
        for label, items in (("dropped", self.dropped), ("new", self.added)):
            by_why: dict[str, list[str]] = defaultdict(list)
            for k, why in items.items():
                by_why[why].append(k)
            for why, keys in sorted(by_why.items()):
                mods = sorted({_module(k, coarse=label == "dropped") for k in keys})
                shown = ", ".join(mods[:6]) + (" …" if len(mods) > 6 else "")
                rows.append((label, f"{shown} ({_n_keys(len(keys))})", why))
        for k, (a, b) in self.resampled.items():
            how = "timm resample_patch_embed" if k.startswith("patch_embed") else "bicubic"
            rows.append(("resampled", k, f"{tuple(a)} -> {tuple(b)} ({how})"))
        for n in self.notes:
            rows.append(("note", "", n))
        w0 = max(len(r[0]) for r in rows)
        w1 = min(64, max(len(r[1]) for r in rows))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


_NUM = re.compile(r"\.(\d+)\.")


def _pattern(key: str) -> str:
    return _NUM.sub(".*.", key, count=1)  # the block index only (mmseg's ffn.layers.0.0 stays)


def _n_keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


def _module(key: str, coarse: bool = False) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn.qkv`` (the parameter's module, any block), or
    ``blocks.*`` when ``coarse``."""
    key = _pattern(key)
    if coarse and ".*." in key:
        return key.split(".*.", 1)[0] + ".*"
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key
