"""Precision (issue #15): ``--amp auto`` is bf16 on CPUs with native bf16 and fp32 elsewhere; both paths train,
and a run says (stdout) and logs (log.jsonl) which one it used."""

from __future__ import annotations

import pytest
import torch

from maecore.engine import describe_amp, hooks, precision, read_log, resolve_amp, resolve_attention
from maecore.errors import UserError

# a 2-block ViT-tiny/8 on 32 px, pixel targets: over 5 epochs of the tiny world (7 steps each) the epoch-mean loss
# falls by about a quarter (measured: 1.70 -> 1.26 in bf16); a batch of 8 is noisy, so epochs are compared
TINY = ["--model", "mae_vit_tiny_patch16", "--patch_size", "8", "--depth", "2", "--input_size", "32", "--decoder_depth", "1",
        "--decoder_embed_dim", "64", "--decoder_num_heads", "4", "--batch_size", "8", "--no_progress", "--vis_every", "0",
        "--warmup_epochs", "0.5", "--blr", "1e-2", "--log_every", "1", "--num_workers", "0", "--device", "cpu", "--epochs", "5"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch, native: bool) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_amp("auto", cpu) == ("bf16" if native else "none")
    assert resolve_amp("auto", cpu, cpu_bf16=False) == "none"  # the benchmarks' fp32-vs-fp32 comparisons
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_amp("none", cpu) == "none"
    line = describe_amp("auto", resolve_amp("auto", cpu), cpu)
    assert line == ("precision: bf16 autocast (--amp auto: this CPU has native bf16 (AVX512-BF16/AMX))" if native
                    else "precision: fp32 (--amp auto: this CPU has no native bf16)")


def test_attention_auto_is_explicit_only_under_bf16_on_a_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, "bf16") == "explicit"  # torch's fused CPU kernel is slow in bf16
    assert resolve_attention("auto", cpu, "none") == "fused"
    assert resolve_attention("auto", cuda, "bf16") == "fused" and resolve_attention("auto", cuda, "fp16") == "fused"
    assert resolve_attention("fused", cpu, "bf16") == "fused" and resolve_attention("explicit", cuda, "none") == "explicit"
    with pytest.raises(UserError, match="--attn"):
        resolve_attention("flash", cpu, "none")


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_fp32_and_bf16_both_train_and_the_choice_is_logged(tiny_world, tmp_path, capsys, amp: str) -> None:
    from pretrain.train import main

    out = tmp_path / amp
    main([*TINY, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(out), "--amp", amp])
    printed = capsys.readouterr().out
    attn = "explicit" if amp == "bf16" else "fused"
    assert f"precision: {'bf16 autocast' if amp == 'bf16' else 'fp32'} (--amp {amp}); attention: {attn} (--attn auto)" in printed
    run = read_log(out, "run")
    assert len(run) == 1 and run[0]["amp"] == amp and run[0]["amp_flag"] == amp and run[0]["attn"] == attn
    losses = [r["loss"] for r in read_log(out, "train")]
    assert len(losses) == 35
    first, last = sum(losses[:7]) / 7, sum(losses[-7:]) / 7
    assert last < 0.9 * first, (amp, losses)  # it learns, in either precision


def test_without_a_bar_a_status_line_keeps_moving(tiny_world, tmp_path, capsys, monkeypatch) -> None:
    """No terminal (a log file, the demo, --no_progress): a line every STATUS_EVERY_S with step, loss, rate, time
    left (0 here: a line after every step)."""
    from pretrain.train import main

    monkeypatch.setattr(hooks, "STATUS_EVERY_S", 0.0)
    main([*TINY, "--data_path", str(tiny_world["imagenet"]), "--output_dir", str(tmp_path / "o"), "--epochs", "1"])
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  step ")]
    assert len(lines) == 7 and lines[0].startswith("step 1/7, epoch 0, loss ") and lines[-1].startswith("step 7/7, epoch 0, loss ")
    assert all(" img/s" in ln and ln.endswith(" left") for ln in lines)
