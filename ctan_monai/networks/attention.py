"""Task attention in the encoder (MTAN, and CTAN's cross-task attention encoder, CTAE, paper Eq. 1) and the
cross-task attention bottleneck (CTAB, paper Eq. 2)."""

from __future__ import annotations

import torch
from torch import nn

from ctan_monai.networks.blocks import conv_norm_act, max_pool

__all__ = [
    "CTAB_NORMALIZATIONS",
    "CrossTaskAttentionBottleneck",
    "TaskAttentionBlock",
    "TaskAttentionStage",
    "cross_task_attention",
    "mix_other_tasks",
]

CTAB_NORMALIZATIONS = ("mean", "none", "softmax")


class TaskAttentionBlock(nn.Module):
    """MTAN's attention block: 1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid, giving a soft mask over features.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the block's input F_t^j (U^j, or U^j concatenated with the previous task feature).
        channels: channels of the mask (those of P^j).
        reduction: the hidden width is ``channels // reduction`` (at least 8).

    Example:
        >>> TaskAttentionBlock(2, 128, 64)(torch.zeros(1, 128, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.hidden = conv_norm_act(spatial_dims, in_channels, hidden, kernel_size=1)
        self.mask = conv_norm_act(spatial_dims, hidden, channels, kernel_size=1, act="sigmoid")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the mask A_t^j in (0, 1), shaped like P^j."""
        return self.mask(self.hidden(features))


def mix_other_tasks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each task, the mean of the *other* tasks' masks (CTAE). With two tasks this swaps them (paper Eq. 1);
    with more it is our generalisation; with one task the task's own mask is returned.

    Args:
        masks: one mask per task, all of one shape.

    Returns:
        one mixed mask per task, in the same order.

    Example:
        >>> a, b = torch.zeros(1), torch.ones(1)
        >>> [m.item() for m in mix_other_tasks([a, b])]
        [1.0, 0.0]
    """
    num_tasks = len(masks)
    if num_tasks == 1:
        return masks
    if num_tasks == 2:
        return [masks[1], masks[0]]
    total = masks[0]
    for m in masks[1:]:
        total = total + m
    return [(total - m) / (num_tasks - 1) for m in masks]


class TaskAttentionStage(nn.Module):
    """One encoder stage of task attention, for all tasks: MTAN (own mask) or CTAE (other tasks' masks, Eq. 1).

    For task t at stage j: A_t^j = Att_t^j(F_t^j) with F_t^j = U^j at the first stage and concat(U^j, Â_t^{j-1})
    after it (the paper sets Â^{j-1} to zero at the first stage; leaving it out is the same and cheaper). The task
    feature is X_t^j = M_t^j * P^j, with M_t^j = A_t^j (MTAN) or the mean of the other tasks' masks (CTAN), and the
    next stage receives Â_t^j = Pool(X_t^j). Pool is shared by the tasks, as MTAN's per-stage attention
    convolution is: 2x max pool then 1x1 conv, BN, ReLU to the next stage's width (pooling first costs a quarter of
    the 3x3-conv-then-pool of MTAN's ResNet variants; the choice is ours and documented).

    Args:
        spatial_dims: 2 or 3.
        channels: channels of U^j and P^j.
        num_tasks: number of tasks.
        first: True for the first stage (no previous task feature).
        next_channels: channels of the next stage, or 0 for the last stage (no Pool).
        cross_task: True for CTAN's CTAE, False for MTAN.
        reduction: hidden width divisor of the attention blocks.

    Example:
        >>> stage = TaskAttentionStage(2, 64, num_tasks=2, first=True, next_channels=128, cross_task=True)
        >>> feats, nxt = stage(torch.zeros(1, 64, 8, 8), torch.zeros(1, 64, 8, 8), [])
        >>> feats[0].shape, nxt[0].shape
        (torch.Size([1, 64, 8, 8]), torch.Size([1, 128, 4, 4]))
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_tasks: int,
        first: bool,
        next_channels: int,
        cross_task: bool,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        in_channels = channels if first else 2 * channels
        self.attention = nn.ModuleList(
            [TaskAttentionBlock(spatial_dims, in_channels, channels, reduction) for _ in range(num_tasks)]
        )
        self.cross_task = cross_task
        self.has_pool = next_channels > 0
        self.pool = (
            nn.Sequential(max_pool(spatial_dims), conv_norm_act(spatial_dims, channels, next_channels, kernel_size=1))
            if next_channels > 0
            else nn.Identity()
        )

    def forward(
        self, u: torch.Tensor, p: torch.Tensor, previous: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Apply the stage.

        Args:
            u: U^j, shared.
            p: P^j, shared.
            previous: Â_t^{j-1} per task (empty at the first stage).

        Returns:
            ``(features, pooled)``: X_t^j per task (skip connections / bottleneck) and Â_t^j per task for the next
            stage (empty at the last stage).
        """
        masks: list[torch.Tensor] = []
        for t, block in enumerate(self.attention):
            inputs = u if len(previous) == 0 else torch.cat([u, previous[t]], dim=1)
            masks.append(block(inputs))
        if self.cross_task:
            masks = mix_other_tasks(masks)
        features = [m * p for m in masks]
        pooled: list[torch.Tensor] = []
        if self.has_pool:
            for f in features:
                pooled.append(self.pool(f))
        return features, pooled


def cross_task_attention(
    own: torch.Tensor, other: torch.Tensor, normalization: str = "mean", order: str = "auto"
) -> torch.Tensor:
    """Paper Eq. 2 on flattened features: Ā_t = Ê_t (Ê_{t'}^T Ê_t); key and value are the task's own embedding
    ``own``, the query the other task's ``other``.

    The product is evaluated in the cheaper association order for the shapes at hand: (Ê_{t'}^T Ê_t) is N x N and
    (Ê_t Ê_{t'}^T) is C x C, so N <= C uses the first and N > C the second (same result up to rounding).

    Mixed precision: the products, the scaling and the softmax run in float32 (float64 inputs: float64) with
    autocast switched off, and the result is cast back to the inputs' dtype: bf16 keeps 8 bits of mantissa and fp16
    overflows at 65504, so sums over C and N of products would lose either the small differences or the range. At
    the bottleneck (C and N of a few hundred at most) this costs little.

    Args:
        own: Ê_t, [B, C, N].
        other: Ê_{t'}, [B, C, N].
        normalization: ``"mean"`` (default, ours): each of the two contractions averages instead of summing, i.e.
            the printed product divided by C*N; the scaling is applied before each matrix product, so no
            intermediate grows with C or N and half precision does not overflow. ``"none"``: Eq. 2 exactly as
            printed (overflows float16 at realistic sizes). ``"softmax"``: the query-key products are scaled by
            1/sqrt(C) and normalised with a softmax over the summed (query) positions, so each output position is a
            convex combination of value vectors (needs the N x N order).
        order: ``"auto"`` (the cheaper one), ``"positions"`` (form the N x N product first) or ``"channels"`` (form
            the C x C product first); ignored by ``"softmax"``.

    Returns:
        Ā_t, [B, C, N], in the dtype of ``own``.

    Raises:
        ValueError: for an unknown normalisation or mismatched shapes.

    Example:
        >>> e1, e2 = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
        >>> cross_task_attention(e1, e2, "none").shape
        torch.Size([2, 8, 4])
    """
    if own.shape != other.shape or own.dim() != 3:
        raise ValueError("cross_task_attention expects two [B, C, N] tensors of one shape")
    if normalization != "mean" and normalization != "none" and normalization != "softmax":
        raise ValueError("unknown CTAB normalization " + normalization + "; use one of mean, none, softmax")
    if order not in ("auto", "positions", "channels"):
        raise ValueError("unknown association order " + order + "; use auto, positions or channels")
    low = own.dtype == torch.float16 or own.dtype == torch.bfloat16
    full_own, full_other = (own.float(), other.float()) if low else (own, other)  # float64 stays float64
    if torch.jit.is_scripting():
        out = _cross_task_attention_full(full_own, full_other, normalization, order)
    else:
        out = _cross_task_attention_no_autocast(full_own, full_other, normalization, order)
    return out.to(own.dtype)


@torch.jit.unused
def _cross_task_attention_no_autocast(
    own: torch.Tensor, other: torch.Tensor, normalization: str, order: str
) -> torch.Tensor:
    """``_cross_task_attention_full`` with autocast switched off (eager mode; TorchScript has no autocast here)."""
    with torch.autocast(device_type=own.device.type, enabled=False):
        return _cross_task_attention_full(own, other, normalization, order)


def _cross_task_attention_full(own: torch.Tensor, other: torch.Tensor, normalization: str, order: str) -> torch.Tensor:
    """``cross_task_attention`` on float32 (or float64) inputs, arguments already checked."""
    channels = own.shape[1]
    positions = own.shape[2]
    if normalization == "softmax":
        scores = torch.bmm(other.transpose(1, 2), own) / (float(channels) ** 0.5)  # [B, N(query), N(key)]
        return torch.bmm(own, torch.softmax(scores, dim=1))
    if normalization == "mean":
        scale_c = 1.0 / float(channels)
        scale_n = 1.0 / float(positions)
    else:  # "none"
        scale_c = 1.0
        scale_n = 1.0
    if order == "positions" or (order == "auto" and positions <= channels):
        gram = torch.bmm(other.transpose(1, 2), own * scale_c)  # [B, N, N], contracts C
        return torch.bmm(own, gram * scale_n)  # contracts N
    gram = torch.bmm(own, (other * scale_n).transpose(1, 2))  # [B, C, C], contracts N
    return torch.bmm(gram, own * scale_c)  # contracts C


class CrossTaskAttentionBottleneck(nn.Module):
    """CTAB (paper Fig. 2-b, Eq. 2): per task a task-embedding block (1x1 conv, BN, ReLU) gives Ê_t from the task's
    bottleneck feature; each task's output is ``cross_task_attention(Ê_t, Ê_{t'})`` with Ê_{t'} the other task's
    embedding (the mean of the other tasks' embeddings with more than two tasks; the task's own with one).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the bottleneck features.
        embed_channels: channels of the task embeddings (and of the outputs).
        num_tasks: number of tasks.
        normalization: see ``cross_task_attention``.
        residual: add Ê_t to the output (ours, off by default: the paper forwards Ā_t alone).

    Raises:
        ValueError: for an unknown normalisation.

    Example:
        >>> ctab = CrossTaskAttentionBottleneck(2, 64, 32, num_tasks=2)
        >>> [o.shape for o in ctab([torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 4)])]
        [torch.Size([1, 32, 4, 4]), torch.Size([1, 32, 4, 4])]
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        embed_channels: int,
        num_tasks: int,
        normalization: str = "mean",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if normalization not in CTAB_NORMALIZATIONS:
            raise ValueError(f"unknown CTAB normalization {normalization!r}; use one of {CTAB_NORMALIZATIONS}")
        self.embed = nn.ModuleList(
            [conv_norm_act(spatial_dims, in_channels, embed_channels, kernel_size=1) for _ in range(num_tasks)]
        )
        self.normalization = normalization
        self.residual = residual

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return Ā_t per task, shaped [B, embed_channels, *spatial]."""
        embedded: list[torch.Tensor] = []
        for t, block in enumerate(self.embed):
            embedded.append(block(features[t]))
        queries = mix_other_tasks(embedded)
        outputs: list[torch.Tensor] = []
        for t in range(len(embedded)):
            e = embedded[t]
            flat = cross_task_attention(e.flatten(2), queries[t].flatten(2), self.normalization)
            out = flat.reshape(e.shape)
            if self.residual:
                out = out + e
            outputs.append(out)
        return outputs
