"""The demo's synthetic RL tasks, with dense programmatic rewards.

* :class:`ReverseTask` (``--task reverse``, the default): a prompt ``BOS d1 .. dk =``, the correct
  response ``dk .. d1 EOS``; the reward is the fraction of the ``k + 1`` target positions right.
* :class:`CountTask` (``--task count``): long responses. A prompt ``BOS d =``, the correct response
  counts up from ``d`` for ``--response-tokens`` symbols (modulo the alphabet), then ``EOS``; each
  token is judged against the one before it, so a slip costs a token or two, not the rest.

Partial answers earn partial credit, so the reward curve rises early. No data is downloaded:
prompts come from a seeded generator.

Layouts: ``N`` sequences, ``P`` = longest prompt, ``R`` = response budget (the longest answer plus
``EOS``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

PAD, BOS, EOS, EQUALS = 0, 1, 2, 3
FIRST_SYMBOL = 4


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


class _SymbolAlphabet:
    """What both tasks share: the vocabulary (specials + ``num_symbols`` symbols) and the lengths."""

    num_symbols: int
    prompt_len: int
    response_len: int

    def _check_alphabet(self) -> None:
        if self.num_symbols < 2:
            raise ValueError(f"--num-symbols must be >= 2, got {self.num_symbols}.")

    @property
    def sequence_len(self) -> int:
        """Longest prompt + response."""
        return self.prompt_len + self.response_len

    def vocab_size(self, multiple: int = 1) -> int:
        """Specials + symbols, rounded up to ``multiple`` (the TP size: the vocab is sharded)."""
        return round_up(FIRST_SYMBOL + self.num_symbols, multiple)


@dataclass(frozen=True)
class ReverseTask(_SymbolAlphabet):
    """Reverse ``k`` symbols, ``k`` uniform in ``[min_digits, max_digits]``.

    Attributes:
        min_digits (int): shortest digit string.
        max_digits (int): longest digit string.
        num_symbols (int): size of the digit alphabet (10 for decimal digits).
    """

    min_digits: int = 3
    max_digits: int = 3
    num_symbols: int = 10

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= --min-digits <= --max-digits, got {self.min_digits} and {self.max_digits}.")
        self._check_alphabet()

    @property
    def prompt_len(self) -> int:
        """P: the longest prompt, ``BOS`` + digits + ``=``."""
        return self.max_digits + 2

    @property
    def response_len(self) -> int:
        """R: the response budget, the longest answer plus ``EOS``."""
        return self.max_digits + 1

    def sample_prompts(self, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``num`` random prompts.

        Returns:
            (prompts, prompt_lengths): int64 ``[num, P]`` right-padded with PAD, and int64
            ``[num]`` lengths (``k + 2``).
        """
        digits = torch.randint(self.min_digits, self.max_digits + 1, (num,), generator=generator)
        symbols = torch.randint(0, self.num_symbols, (num, self.max_digits), generator=generator)
        prompts = torch.full((num, self.prompt_len), PAD, dtype=torch.long)
        prompts[:, 0] = BOS
        columns = torch.arange(self.max_digits).unsqueeze(0)
        body = torch.where(columns < digits.unsqueeze(1), symbols + FIRST_SYMBOL, PAD)
        prompts[:, 1 : 1 + self.max_digits] = body
        prompts[torch.arange(num), digits + 1] = EQUALS
        return prompts, digits + 2

    def targets(self, prompts: Tensor, prompt_lengths: Tensor) -> Tensor:
        """The correct responses, int64 ``[N, R]``: reversed digits, ``EOS``, then PAD."""
        num = prompts.size(0)
        digits = prompt_lengths - 2
        position = torch.arange(self.response_len).unsqueeze(0)
        # Response position t copies prompt position k - t (the digits sit at 1..k).
        source = (digits.unsqueeze(1) - position).clamp(min=0)
        copied = prompts.gather(1, source.clamp(max=self.prompt_len - 1))
        targets = torch.where(position < digits.unsqueeze(1), copied, PAD)
        targets[torch.arange(num), digits] = EOS
        return targets

    def rewards(self, responses: Tensor, prompts: Tensor, prompt_lengths: Tensor) -> Tensor:
        """Fraction of the ``k + 1`` target positions (digits and EOS) the response gets right.

        Args:
            responses (Tensor): int64 ``[N, R]`` sampled tokens, PAD after the first EOS.
            prompts (Tensor): int64 ``[N, P]``.
            prompt_lengths (Tensor): int64 ``[N]``.

        Returns:
            Tensor: float32 ``[N]`` in [0, 1].
        """
        targets = self.targets(prompts, prompt_lengths)
        scored = torch.arange(self.response_len).unsqueeze(0) <= (prompt_lengths - 2).unsqueeze(1)
        hits = ((responses == targets) & scored).sum(1)
        return hits.float() / scored.sum(1).float()


@dataclass(frozen=True)
class CountTask(_SymbolAlphabet):
    """Count up from a random symbol, ``length`` symbols long, then ``EOS``.

    Attributes:
        length (int): symbols in the correct response (hundreds make long responses).
        num_symbols (int): size of the alphabet; counting wraps around modulo it.
    """

    length: int = 256
    num_symbols: int = 10

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"--response-tokens must be >= 1, got {self.length}.")
        self._check_alphabet()

    prompt_len = 3
    """P: ``BOS d =``."""

    @property
    def response_len(self) -> int:
        """R: ``length`` symbols plus ``EOS``."""
        return self.length + 1

    def sample_prompts(self, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``num`` prompts ``BOS d =`` (int64 ``[num, 3]``) and their lengths (all 3)."""
        start = torch.randint(0, self.num_symbols, (num,), generator=generator) + FIRST_SYMBOL
        prompts = torch.stack([torch.full((num,), BOS), start, torch.full((num,), EQUALS)], dim=1)
        return prompts, torch.full((num,), self.prompt_len, dtype=torch.long)

    def _successor(self, tokens: Tensor) -> Tensor:
        """The next symbol after each token (PAD where the token is not a symbol)."""
        symbol = tokens - FIRST_SYMBOL
        is_symbol = (symbol >= 0) & (symbol < self.num_symbols)
        return torch.where(is_symbol, (symbol + 1) % self.num_symbols + FIRST_SYMBOL, PAD)

    def targets(self, prompts: Tensor, prompt_lengths: Tensor) -> Tensor:
        """The correct responses, int64 ``[N, R]``: ``length`` counted symbols, then ``EOS``."""
        offsets = torch.arange(1, self.length + 1).unsqueeze(0)
        counted = (prompts[:, 1:2] - FIRST_SYMBOL + offsets) % self.num_symbols + FIRST_SYMBOL
        return torch.cat([counted, torch.full((prompts.size(0), 1), EOS)], dim=1)

    def rewards(self, responses: Tensor, prompts: Tensor, prompt_lengths: Tensor) -> Tensor:
        """Fraction of the ``length + 1`` positions right, each judged against the token before it.

        Position ``t < length`` is right when it holds the successor of the token before it (the
        prompt's symbol for ``t = 0``); position ``length`` when it holds ``EOS``.

        Args:
            responses (Tensor): int64 ``[N, R]``; prompts int64 ``[N, 3]``; prompt_lengths unused.

        Returns:
            Tensor: float32 ``[N]`` in [0, 1].
        """
        previous = torch.cat([prompts[:, 1:2], responses[:, : self.length - 1]], dim=1)
        expected = self._successor(previous)
        # After a non-symbol (EOS, PAD) nothing is right: PAD must not match PAD.
        counted = ((responses[:, : self.length] == expected) & (expected != PAD)).sum(1)
        stopped = responses[:, self.length] == EOS
        return (counted + stopped).float() / self.response_len


Task = ReverseTask | CountTask
TASKS = ("reverse", "count")


def make_task(
    name: str, min_digits: int = 3, max_digits: int = 3, num_symbols: int = 10, response_tokens: int = 256
) -> Task:
    """The task of ``--task`` from its flags (each task checks its own values)."""
    if name == "reverse":
        return ReverseTask(min_digits, max_digits, num_symbols)
    if name == "count":
        return CountTask(response_tokens, num_symbols)
    raise ValueError(f"--task must be one of {TASKS}, got {name!r}.")


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each reward standardised within its group of samples of one prompt.

    Args:
        rewards (Tensor): ``[N]``, the ``group_size`` samples of each prompt consecutive.
        group_size (int): samples per prompt, ``N % group_size == 0``.
        eps (float): added to the group std (groups with equal rewards get advantage 0).

    Returns:
        Tensor: float32 ``[N]``, ``(r - mean_group) / (std_group + eps)`` (unbiased std).
    """
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"--group-size must be >= 2 and divide the {rewards.numel()} sequences of the batch, got {group_size}."
        )
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
