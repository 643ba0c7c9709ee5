"""The sampling fields vLLM's schemas share (OpenAI's requests carry them at the top level, the
token-in/token-out route in `sampling_params`), and what they become for the engine."""

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from frontend.http.app import HttpContext


class VllmSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(default=1, ge=1, le=64)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    skip_special_tokens: bool = True
    # Fast tokenizers never put spaces between special tokens: either value gives the same text.
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Optional[int] = Field(default=None, ge=0, le=20)

    def engine_kwargs(
        self, logprobs: Optional[int], max_tokens: int, prompt_logprobs: Optional[int] = None
    ) -> dict[str, Any]:
        """The engine's sampling fields (validated again by the client); `prompt_logprobs` None:
        the request's own."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        )  # fmt: skip


def room(ctx: HttpContext, prompts: list[list[int]], asked: Optional[int]) -> int:
    """`max_tokens`: what was asked, or all the context the longest prompt leaves."""
    if asked is not None:
        return asked
    return max(1, ctx.max_model_len - max(len(p) for p in prompts))
