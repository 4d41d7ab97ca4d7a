"""Symmetric InfoNCE over negatives gathered from every rank.

Each rank scores its local audio (text) embeddings against the text (audio) embeddings of the
*global* batch: ``torch.distributed.nn.functional.all_gather`` keeps the gathered tensors in the
autograd graph (its backward sums the gradients back to the owning rank), so the effective batch
- and the number of negatives - grows with the number of GPUs. With mean-reduced local losses and
the data-parallel gradient average of DeepSpeed/DDP, every parameter gets exactly the gradient of
the global-batch loss.

Ranks may hold different batch sizes (a short last batch): sizes are gathered first, embeddings are
padded to the largest and the padded columns masked out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` ``[B_local, D]`` from every rank, differentiably.

    Returns ``(gathered [sum of B over ranks, D], offset)``, ``offset`` being this rank's first row
    in ``gathered`` (ranks in order). Single process: ``(x, 0)``."""
    rank, world = _world()
    if world == 1:
        return x, 0
    import warnings

    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    bmax = max(sizes)
    xp = F.pad(x, (0, 0, 0, bmax - x.shape[0])) if x.shape[0] < bmax else x
    with warnings.catch_warnings():  # "deprecated" in favour of an experimental API
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(xp.contiguous())
    gathered = torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)
    return gathered, sum(sizes[:rank])


def contrastive_loss(
    audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE for paired, L2-normalised ``audio`` / ``text`` ``[B_local, D]``.

    Returns ``(loss, metrics)``; metrics (detached scalars): ``loss/audio_to_text``,
    ``loss/text_to_audio``, ``temperature``, ``accuracy`` (in-batch top-1 over the global batch,
    mean of both directions), ``accuracy/audio_to_text``, ``accuracy/text_to_audio``,
    ``global_batch`` (negatives + 1 per row)."""
    if audio.shape != text.shape:
        raise ValueError(f"audio {tuple(audio.shape)} and text {tuple(text.shape)} must pair up")
    audio, text = audio.float(), text.float()  # the softmax in fp32 under bf16 engines
    if gather:
        all_audio, offset = gather_with_grad(audio)
        all_text, _ = gather_with_grad(text)
    else:
        all_audio, all_text, offset = audio, text, 0
    scale = logit_scale.float().exp()
    b = audio.shape[0]
    labels = torch.arange(offset, offset + b, device=audio.device)
    logits_a2t = scale * audio @ all_text.t()  # [B_local, B_global]
    logits_t2a = scale * text @ all_audio.t()
    loss_a2t = F.cross_entropy(logits_a2t, labels)
    loss_t2a = F.cross_entropy(logits_t2a, labels)
    loss = 0.5 * (loss_a2t + loss_t2a)
    with torch.no_grad():
        acc_a2t = (logits_a2t.argmax(dim=1) == labels).float().mean()
        acc_t2a = (logits_t2a.argmax(dim=1) == labels).float().mean()
        metrics = {
            "loss/audio_to_text": loss_a2t.detach(),
            "loss/text_to_audio": loss_t2a.detach(),
            "temperature": (1.0 / scale).detach(),
            "accuracy": 0.5 * (acc_a2t + acc_t2a),
            "accuracy/audio_to_text": acc_a2t,
            "accuracy/text_to_audio": acc_t2a,
            "global_batch": torch.tensor(float(all_text.shape[0])),
        }
    return loss, metrics
