"""Parallel layouts, test batches and their sharding for the multi-process rollout IS tests.

Everything here is deterministic and shared by the spawned workers (which shard a global batch the
way Megatron would) and the parent test (which puts the shards back and compares the whole batch
with the float64 oracle):

* `Layout` / `layouts_for_world`: every TP x CP x PP x DP layout of a given world size.
* `Case` / `global_batch`: one global batch, padded `[rows, width]` or packed documents (THD, kept
  here as padded rows `[docs, width]` with a per-document packed length), generated from a seed.
* `data_parallel_rows` / `micro_batch_rows`: the disjoint sequence slices of DP ranks and their
  micro-batches.
* `pack_documents` / `unpack_documents`: documents of one micro-batch to `[1, t]` plus `cu_seqlens`.
* `cp_local_inputs`: one CP rank's share of a micro-batch, split as Megatron splits it.
"""

import math
from dataclasses import dataclass

import torch

from megatron_rollout_is.config import RolloutISConfig
from megatron_rollout_is.parallel.context_parallel import local_cu_seqlens, split_for_cp, split_thd_for_cp

SIZES = {"tp": (1, 2, 4), "cp": (1, 2, 4), "pp": (1, 2), "dp": (1, 2, 4)}
CP_MULTIPLE = 8  # every sequence / document length is a multiple of 2 * max CP size
VOCAB = 16  # divisible by every TP size
TEMPERATURE = 0.8
THRESHOLDS = {"token": (2.0, 0.4), "sequence": (3.0, 0.2), "geometric": (1.05, 0.9)}
"""level -> (upper, explicit lower) used by the cases."""
_SPREAD = {"token": (0.5, 0.2), "sequence": (0.15, 0.05), "geometric": (0.08, 0.05)}
"""level -> (per-token, per-sequence) standard deviation of the log ratio, so that the thresholds
of `THRESHOLDS` split the weights into in-range and out-of-range ones."""


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int

    def __str__(self) -> str:
        return f"tp{self.tp}-cp{self.cp}-pp{self.pp}-dp{self.dp}"


def layouts_for_world(world_size: int) -> list[Layout]:
    """Every layout with sizes from `SIZES` whose product is `world_size`."""
    return [
        Layout(tp, cp, pp, dp)
        for tp in SIZES["tp"]
        for cp in SIZES["cp"]
        for pp in SIZES["pp"]
        for dp in SIZES["dp"]
        if tp * cp * pp * dp == world_size
    ]


@dataclass(frozen=True)
class Case:
    """One global batch and rollout IS config.

    `kind` selects the data: "random"; "nonfinite" (NaN/inf log-probs on a few valid tokens);
    "no_valid" (every mask entry 0); "empty_first_rows" (the first 4 sequences, all of DP rank 0's
    share at dp = 4, have no valid token); "vocab" (old log-probs come from vocab-parallel logits).
    """

    name: str
    packing: str  # "padded" or "thd"
    level: str
    mode: str
    veto: float | None
    dtype: str  # "float64" or "float32"
    micro_batches: int
    seed: int
    explicit_lower: bool = False
    rows: int = 13
    width: int = 32
    kind: str = "random"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def upper(self) -> float:
        return THRESHOLDS[self.level][0]

    @property
    def lower(self) -> float | None:
        return THRESHOLDS[self.level][1] if self.explicit_lower else None

    def config(self) -> RolloutISConfig:
        """The verl 0.6.0 rollout IS config of this case."""
        return RolloutISConfig(
            rollout_is=True,
            rollout_is_threshold=self.upper,
            rollout_is_threshold_lower=self.lower,
            rollout_is_level=self.level,
            rollout_is_mode=self.mode,
            rollout_is_veto_threshold=self.veto,
        )


def build_cases(with_vocab_parallel: bool) -> list[Case]:
    """The case matrix each layout runs: level x mode x veto x dtype x packing, plus edge cases."""
    cases = []
    for packing in ("padded", "thd"):
        for dtype in ("float64", "float32"):
            for level in THRESHOLDS:
                for mode in ("truncate", "clip"):
                    for veto in (None, 1e-3):
                        index = len(cases)
                        cases.append(
                            Case(
                                name=f"{packing}-{dtype}-{level}-{mode}-{'veto' if veto else 'noveto'}",
                                packing=packing,
                                level=level,
                                mode=mode,
                                veto=veto,
                                dtype=dtype,
                                micro_batches=1 + index % 4,
                                seed=1000 + index,
                                explicit_lower=index % 3 == 1,
                                rows=(13, 16)[index % 2],
                            )
                        )
    edge = [
        ("nonfinite", "padded", "token", "clip", 1e-3, "float64", 2),
        ("nonfinite", "thd", "sequence", "truncate", None, "float32", 3),
        ("no_valid", "padded", "geometric", "clip", 1e-3, "float64", 2),
        ("no_valid", "thd", "token", "truncate", None, "float32", 1),
        ("empty_first_rows", "padded", "token", "truncate", 1e-3, "float32", 4),
        ("empty_first_rows", "thd", "geometric", "mask", None, "float64", 2),
    ]
    if with_vocab_parallel:
        edge += [
            ("vocab", "padded", "token", "truncate", 1e-3, "float32", 2),
            ("vocab", "padded", "sequence", "clip", None, "float64", 3),
            ("vocab", "padded", "geometric", "mask", 1e-3, "float32", 1),
        ]
    for kind, packing, level, mode, veto, dtype, micro_batches in edge:
        cases.append(
            Case(
                name=f"{kind}-{packing}-{dtype}-{level}-{mode}-{'veto' if veto else 'noveto'}",
                packing=packing,
                level=level,
                mode=mode,
                veto=veto,
                dtype=dtype,
                micro_batches=micro_batches,
                seed=2000 + len(cases),
                rows=16,
                kind=kind,
            )
        )
    return cases


@dataclass
class GlobalBatch:
    """The unsharded batch, rows = sequences (padded) or documents (THD).

    Attributes:
        old: `[rows, width]` training log-probs as the ranks see them (NaN on padding).
        oracle_old: `[rows, width]` float64 old log-probs for the oracle (differs from `old` only
            for "vocab" cases: the exact log-softmax of `logits`).
        rollout: `[rows, width]` rollout log-probs (NaN on padding).
        mask: `[rows, width]` int64 response mask.
        lengths: `[rows]` THD packed document lengths (multiples of `CP_MULTIPLE`, 0 allowed; mask
            is 0 past them); `width` for every row of a padded batch.
        logits: "vocab" cases only: `[width, rows, VOCAB]` logits (sequence-first, as Megatron).
        target: "vocab" cases only: `[width, rows]` token ids whose log-probs `old` holds.
    """

    old: torch.Tensor
    oracle_old: torch.Tensor
    rollout: torch.Tensor
    mask: torch.Tensor
    lengths: list
    logits: torch.Tensor | None = None
    target: torch.Tensor | None = None


def global_batch(case: Case) -> GlobalBatch:
    """The global batch of `case`, identical in every process (seeded generator)."""
    generator = torch.Generator().manual_seed(case.seed)
    rows, width = case.rows, case.width

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    if case.packing == "thd":
        choices = [width * k // 4 for k in range(1, 5)]
        lengths = [choices[int(i)] for i in torch.randint(0, 4, (rows,), generator=generator)]
        if case.seed % 3 == 0:
            lengths[2] = 0  # an empty document inside a pack
    else:
        lengths = [width] * rows

    token_spread, sequence_spread = _SPREAD[case.level]
    log_ratio = sequence_spread * torch.randn(rows, 1, generator=generator, dtype=torch.float64)
    log_ratio = log_ratio + token_spread * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    log_ratio[1] += 1.5  # a far-off sequence: its sequence log weight passes the safety bound of 20
    catastrophic = uniform(rows, width) < 0.02
    log_ratio = torch.where(catastrophic, log_ratio - 8.0, log_ratio)  # ratio ~ 3e-4 < the veto 1e-3

    mask = torch.zeros(rows, width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        start = int(torch.randint(0, width // 4 + 1, (1,), generator=generator))
        if length <= start or uniform(1).item() < 0.15:
            continue  # an empty sequence (no valid token)
        count = int(torch.randint(1, length - start + 1, (1,), generator=generator))
        mask[row, start : start + count] = (uniform(count) > 0.1).long()  # with holes
    if case.kind == "no_valid":
        mask.zero_()
    elif case.kind == "empty_first_rows":
        mask[:4] = 0

    logits = target = None
    if case.kind == "vocab":
        logits = (2.0 * torch.randn(width, rows, VOCAB, generator=generator, dtype=torch.float64)).to(case.torch_dtype)
        target = torch.randint(0, VOCAB, (width, rows), generator=generator)
        scaled = logits.double() / TEMPERATURE
        oracle_old = scaled.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).t().contiguous()
    else:
        oracle_old = -(0.05 + 3.95 * uniform(rows, width))
    rollout = (oracle_old - log_ratio).to(case.torch_dtype)
    old = oracle_old.to(case.torch_dtype)
    if case.kind != "vocab":
        old[mask == 0] = math.nan  # padding holds garbage that must be ignored
    rollout[mask == 0] = math.nan
    if case.kind == "nonfinite":
        valid = mask.nonzero()
        picks = valid[torch.randperm(valid.shape[0], generator=generator)[:4]]
        old[picks[0, 0], picks[0, 1]] = math.nan
        rollout[picks[1, 0], picks[1, 1]] = math.inf
        old[picks[2, 0], picks[2, 1]] = -math.inf
        rollout[picks[3, 0], picks[3, 1]] = math.nan
    if case.kind != "vocab":
        oracle_old = old.double()
    return GlobalBatch(old, oracle_old, rollout, mask, lengths, logits, target)


def data_parallel_rows(num_rows: int, dp: int, dp_rank: int) -> torch.Tensor:
    """Global row indices of DP rank `dp_rank`'s contiguous share (sizes differ by at most 1)."""
    return torch.arange(num_rows).tensor_split(dp)[dp_rank]


def micro_batch_rows(case: Case, dp: int, dp_rank: int) -> list[torch.Tensor]:
    """The global rows of each micro-batch of a DP rank; every DP rank gets the same count."""
    smallest_share = case.rows // dp
    count = min(case.micro_batches, smallest_share)
    return list(data_parallel_rows(case.rows, dp, dp_rank).tensor_split(count))


def pack_documents(tensor: torch.Tensor, rows: torch.Tensor, lengths: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs documents `rows` of a `[docs, width]` tensor into `[1, t]` and their `cu_seqlens`."""
    pieces = [tensor[row, : lengths[row]] for row in rows.tolist()]
    sizes = torch.tensor([0] + [lengths[row] for row in rows.tolist()])
    return torch.cat(pieces).unsqueeze(0), sizes.cumsum(0)


def unpack_documents(packed: torch.Tensor, rows: torch.Tensor, lengths: list, out: torch.Tensor) -> None:
    """Writes a `[1, t]` pack of documents `rows` back into the rows of `out` `[docs, width]`."""
    start = 0
    for row in rows.tolist():
        out[row, : lengths[row]] = packed[0, start : start + lengths[row]]
        start += lengths[row]


def cp_local_inputs(case: Case, batch: GlobalBatch, rows: torch.Tensor, cp: int, cp_rank: int) -> tuple:
    """CP rank `cp_rank`'s `(old, rollout, mask)` of the micro-batch `rows`, and its local cu_seqlens.

    Padded cases: `[b, s/cp]` zigzag shards and None; THD cases: `[1, t/cp]` shards of the packed
    documents and the `[docs + 1]` local cu_seqlens.
    """
    tensors = (batch.old, batch.rollout, batch.mask)
    if case.packing == "padded":
        return [split_for_cp(t[rows], cp, cp_rank) for t in tensors], None
    packed = [pack_documents(t, rows, batch.lengths) for t in tensors]
    cu_seqlens = packed[0][1]
    return [split_thd_for_cp(p, cu_seqlens, cp, cp_rank) for p, _ in packed], local_cu_seqlens(cu_seqlens, cp)
