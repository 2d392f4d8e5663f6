"""The demo's synthetic RL task: reverse a short digit string, with a dense programmatic reward.

A prompt is ``BOS d1 .. dk =`` and the correct response ``dk .. d1 EOS``. The reward of a sampled
response is the fraction of the ``k + 1`` target positions it gets right, so partial answers earn
partial credit and the reward curve rises early. No data is downloaded: prompts come from a seeded
generator.

Layouts: ``N`` sequences, ``P`` = longest prompt (``max_digits + 2``), ``R`` = response budget
(``max_digits + 1`` tokens).
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

PAD, BOS, EOS, EQUALS = 0, 1, 2, 3
FIRST_SYMBOL = 4


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ReverseTask:
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
            raise ValueError(
                f"need 1 <= --min-digits <= --max-digits, got {self.min_digits} and {self.max_digits}."
            )
        if self.num_symbols < 2:
            raise ValueError(f"--num-symbols must be >= 2, got {self.num_symbols}.")

    @property
    def prompt_len(self) -> int:
        """P: the longest prompt, ``BOS`` + digits + ``=``."""
        return self.max_digits + 2

    @property
    def response_len(self) -> int:
        """R: the response budget, the longest answer plus ``EOS``."""
        return self.max_digits + 1

    @property
    def sequence_len(self) -> int:
        """Longest prompt + response."""
        return self.prompt_len + self.response_len

    def vocab_size(self, multiple: int = 1) -> int:
        """Specials + symbols, rounded up to ``multiple`` (the TP size: the vocab is sharded)."""
        return round_up(FIRST_SYMBOL + self.num_symbols, multiple)

    def sample_prompts(self, num: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
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
            f"--group-size must be >= 2 and divide the {rewards.numel()} sequences of the batch, "
            f"got {group_size}."
        )
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)
