"""The one prompt format every method shares.

Methods differ only in *where* the context goes (nowhere, the prompt, a state, fine-tuned
weights); the question, and the tokens the answer is scored on, are formatted identically, so
score differences come from the adaptation and not from prompt wording.

Format: the base LM's chat template when it has one (one user turn: optional context, then
the question; the answer is the assistant turn), else plain "Question: ...\\nAnswer:". A
`Cloze` question is one the answer continues ("The code for zorba is" -> "4711"): it follows the
context as plain text in every format, never as a chat turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from genadapter.data.episodes import Cloze

CONTEXT_SEPARATOR = "\n\n"


def join_context(context_texts: list[str]) -> str:
    """The context stream as one prompt string (the form `prompt` methods put in the prompt)."""
    return CONTEXT_SEPARATOR.join(t.strip() for t in context_texts if t.strip())


@dataclass
class PromptFormat:
    """Turns (question, optional context) into prompt ids and answers into target ids."""

    tokenizer: object
    use_chat_template: bool | None = None  # None: use it when the tokenizer has one

    def __post_init__(self) -> None:
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def plain_text(self, question: str) -> bool:
        """Whether the question is prompted as plain text (a cloze, or no chat template)."""
        return isinstance(question, Cloze) or not self.use_chat_template

    def prompt_text(self, question: str, context: str | None = None) -> str:
        body = f"{context}{CONTEXT_SEPARATOR}{question}" if context else str(question)
        if isinstance(question, Cloze):
            return body
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
        if context:
            return f"{context}{CONTEXT_SEPARATOR}Question: {question}\nAnswer:"
        return f"Question: {question}\nAnswer:"

    def prompt_ids(self, question: str, context: str | None = None) -> list[int]:
        # A chat template already spells out its special tokens; plain text gets the usual BOS.
        text = self.prompt_text(question, context)
        return self.tokenizer(text, add_special_tokens=self.plain_text(question)).input_ids

    def answer_ids(self, answer: str, question: str = "") -> list[int]:
        """Target tokens of an answer, as they follow the prompt (plain text: after a space)."""
        text = " " + answer.strip() if self.plain_text(question) else answer.strip()
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def clean_answer(self, generated: str, question: str = "") -> str:
        """First line of the generated text (answers are short, models ramble on); of a cloze's
        continuation, its first sentence."""
        lines = [ln.strip() for ln in generated.strip().splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        return re.split(r"(?<=[.!?])\s", first)[0] if isinstance(question, Cloze) else first

    def stop_token_ids(self) -> list[int]:
        """End of sequence (for chat templates the end-of-turn token is the tokenizer's EOS)."""
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]


def as_tensor(ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)
