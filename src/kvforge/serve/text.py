"""Text in and out of the server: chat prompts, and generated text released as stop strings allow."""

from __future__ import annotations


class NoChatTemplate(ValueError):
    """The model has no chat template (a base model) and none was given: chat requests are refused rather
    than run in an invented prompt format."""


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` (``[{"role", "content"}]``) in the model's chat template, ready for the
    assistant's reply. Raises :class:`NoChatTemplate` when the tokenizer has none (``kvforge serve
    --chat-template FILE`` gives one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this model has no chat template (it is a base model): send /v1/completions with a "
                             "prompt, or start the server with --chat-template FILE (a Jinja chat template)")
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


class TextStream:
    """Decodes generated tokens into text and releases it in pieces that are final.

    Text that could still become a stop string is held back until it cannot, and a stop string ends the
    text before it (the stop string itself is not returned, as the OpenAI API documents). A trailing
    replacement character (half of a multi-byte character) is held until the next token completes it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the newly final text (maybe empty). Sets ``stopped``."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._release(len(self.text))
        self.text = text
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = len(text) - hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._release(end)

    def flush(self) -> str:
        """The rest of the text (generation ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
