"""Each generated token as data: its id, its own text, its log-probability, whether it is a special token, and
its top_logprobs alternatives. The front model sends this as JSON (`tokens_json`) when a request sets
return_tokens; OpenAI's logprobs objects and TGI's token events are built from it."""

from __future__ import annotations

import functools

from ..tokenizer import TextTokenizer


class TokenDetails:
    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        # A plain token to decode each token after: a tokenizer drops the leading space of a whole text
        # (sentencepiece's "▁an" alone decodes to "an"), never that of a token in the middle, and TGI and OpenAI give
        # a token's text as it stands in the middle of the output, space included.
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor, skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)
    def text_of(self, token: int) -> tuple[str, bool]:
        """A token's text as it stands after other text (special tokens included), and whether it is special: a
        token whose text vanishes when special tokens are skipped."""
        alone = self.tokenizer.decode([token], skip_special_tokens=False)
        after = self.tokenizer.decode(self.anchor + [token], skip_special_tokens=False)
        text = after[len(self.anchor_text):] if self.anchor and after.startswith(self.anchor_text) else alone
        return text, bool(alone) and not self.tokenizer.decode([token], skip_special_tokens=True)

    def entries(self, ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]]) -> list[dict]:
        """One dict per token of `ids` (the newest tokens of a response, in order)."""
        out = []
        for i, (token, logprob) in enumerate(zip(ids, logprobs, strict=True)):
            text, special = self.text_of(int(token))
            entry = {"id": int(token), "text": text, "logprob": logprob, "special": special}
            if tops:
                entry["top_logprobs"] = [{"id": int(t), "text": self.text_of(int(t))[0], "logprob": lp}
                                         for t, lp in tops[i]]
            out.append(entry)
        return out
