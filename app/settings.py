"""The one settings object: environment variables with the ``SEA_`` prefix, or CLI flags generated from it."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.defaults import KEYWORD_WEIGHT, PRINCIPLE_CLIP, SAFETY_PRINCIPLE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEA_", extra="ignore")

    # Models
    model: str = Field("", description="Reference LM: a local folder, a Hugging Face id, or a .gguf file. Empty: the embedded SmolLM2-135M-Instruct.")
    reward_model: str = Field("", description="Optional sequence-classification reward model (folder or hub id) sharing the reference vocabulary; served as reward `rm`.")
    reward: str = Field("principle", description="Default reward: comma-separated `name[:weight]` of loaded rewards (`principle`, `rm`).")
    principle: str = Field(SAFETY_PRINCIPLE, description="System prompt of the contrastive principle reward log pi(y|principle,x) - log pi(y|x).")
    principle_clip: float = Field(PRINCIPLE_CLIP, gt=0, description="The most one response token earns from the principle reward, in nats; a prompt primes its own words, so without a limit a high alpha pays for reciting it. `inf`: no limit.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype: auto is bf16 on CUDA, float32 on CPU.")
    cache_dir: str = Field("", description="Folder for the dequantised copy of GGUF models. Empty: $XDG_CACHE_HOME/sea-serve.")
    threads: int = Field(0, ge=0, description="Torch CPU threads; 0 keeps torch's default.")

    # Server
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field("info", description="Log level.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Comma-separated API keys; when set, every API endpoint but /health, /ready and /metrics needs `Authorization: Bearer <key>` (the docs and playground pages load without one). A job is readable and cancellable only with the key that submitted it.")
    api_keys_file: str = Field("", description="File with more API keys, one per line (blank lines and `#` comments skipped); read once at start-up.")
    metrics_require_key: bool = Field(False, description="Also require the API key on /metrics.")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Comma-separated origins allowed by CORS; empty: CORS off.")

    # Queue and batching
    max_batch_chains: int = Field(32, ge=1, description="Most chains (rows) the engine runs in one batch.")
    max_queue: int = Field(64, ge=1, description="Most requests waiting for room in the batch; past it requests get 429.")
    max_jobs_per_key: int = Field(0, ge=0, description="Most unfinished requests (queued or running) one API key may have on this replica; "
                                  "past it 429, so that one client cannot fill the queue for all. 0: no limit. Applies with API keys only.")
    batch_window_ms: float = Field(10.0, ge=0, le=1000, description="An idle engine that takes a request waits until no other has come for this long (at most 10 times as long in all), so that requests sent together start in one batch; 0: start at once.")
    job_ttl_seconds: float = Field(600.0, gt=0, description="How long finished jobs stay readable.")
    request_timeout_seconds: float = Field(600.0, gt=0, description="Server maximum for one request's run time; past it 504.")
    drain_seconds: float = Field(30.0, ge=0, description="On SIGTERM, how long running and queued work may take to finish.")

    # Shared job store (several replicas)
    redis_url: SecretStr = Field("", description="Redis URL (e.g. `redis://redis:6379/0`) of a job store shared by every replica: any replica answers for any job and queued jobs go to whichever has room. Empty: jobs live in this process.")
    redis_prefix: str = Field("sea", description="Prefix of this service's Redis keys.")
    replica_lease_seconds: float = Field(15.0, gt=0, description="A replica that has not renewed its lease for this long is taken for dead; its running jobs are retried or failed.")
    job_max_attempts: int = Field(2, ge=1, description="How many replicas may start a job whose replica died before it is marked failed.")

    # Performance
    compile: bool = Field(False, description="Compile the reference LM's forward with torch.compile (pays off on GPU after warm-up; a gradient pass compiles at start, each other kind of pass at its first call).")

    # Request defaults and limits
    default_chains: int = Field(4, ge=1, description="Chains per request when the request does not say.")
    default_steps: int = Field(20, ge=0, description="Langevin steps when the request does not say.")
    default_alpha: float = Field(1.0, ge=0, le=1000, allow_inf_nan=False, description="Reward weight alpha when the request does not say.")
    default_keyword_weight: float = Field(KEYWORD_WEIGHT, ge=0, le=1000, description="Weight of a request's keyword reward (the fraction of its words used) when the request does not say: at alpha 1 an answer with every word gains this many nats, enough to bring in words the model would not propose.")
    default_max_tokens: int = Field(32, ge=1, description="Response length in tokens when the request does not say.")
    default_select: Literal["reward", "energy"] = Field(
        "reward", description="How the returned chain (sea) or sample (bon) is picked when the request does not say: the highest "
                              "reward (the paper's pick) or the lowest energy (with the principle reward, the more fluent answer: "
                              "docs/quality.md).")
    max_tokens_limit: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    max_chains: int = Field(16, ge=1, description="Largest chains a request may ask for.")
    max_steps: int = Field(200, ge=0, description="Largest steps a request may ask for.")
    max_samples: int = Field(256, ge=1, description="Largest N a Best-of-N request may ask for.")
    max_listed_log_probs: int = Field(
        262_144, ge=1, description="Most token log-probs one request may list (`logprobs`: each listed chain's or sample's tokens "
                                   "times the alternatives + 1): bounds the answer's size and the memory its kept result holds.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt, in tokens.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; past it 413.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value, info: ValidationInfo):
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if info.field_name == "api_keys" and value and not parts:  # fail closed, like an empty keys file
                raise ValueError("SEA_API_KEYS holds no key (only commas and spaces); leave it unset for an open API")
            return parts
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("reward")
    @classmethod
    def _a_reward_spec(cls, value: str) -> str:
        parse_reward_spec(value)  # which names are served is checked when the models load
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        """A default past its own limit would answer every request that relies on it with an error naming the request."""
        for default, limit in (("default_max_tokens", "max_tokens_limit"), ("default_steps", "max_steps"),
                               ("default_chains", "max_chains"), ("default_chains", "max_batch_chains")):
            if getattr(self, default) > getattr(self, limit):
                raise ValueError(f"SEA_{default.upper()} ({getattr(self, default)}) is past SEA_{limit.upper()} ({getattr(self, limit)})")
        return self

    def limits(self) -> dict[str, int]:
        """The largest value of each request parameter that a server limit bounds (OpenAI's names too)."""
        chains = min(self.max_chains, self.max_batch_chains)
        return {"max_tokens": self.max_tokens_limit, "max_completion_tokens": self.max_tokens_limit,
                "max_output_tokens": self.max_tokens_limit, "chains": chains, "steps": self.max_steps,
                "init_samples": self.max_samples, "samples": self.max_samples, "beams": chains, "successors": self.max_samples,
                "n": min(chains, self.max_samples)}  # /v1's n: n chains (sea) or n samples (bon)

    def limit_error(self, config) -> tuple[str, str] | None:
        """The first parameter of ``config`` (an engine ``SEAConfig``) past a server limit, as (field, message)."""
        limits = self.limits()
        for name in ("max_tokens", "chains", "steps", "init_samples", "samples", "beams", "successors"):
            value = getattr(config, name) or 0
            if value > limits[name]:
                if name == "chains" and value <= self.max_chains:
                    return "chains", f"chains must be at most {self.max_batch_chains} (the engine batch size)"
                return name, f"{name} must be at most {limits[name]} (server limit), got {value}"
        if config.logprobs is not None:
            listed = (config.logprobs + 1) * config.max_tokens * config.logprob_chains
            if listed > self.max_listed_log_probs:
                return "logprobs", (f"logprobs would list {listed} log-probs ({config.logprobs} alternatives + the token, {config.max_tokens} "
                                    f"tokens, {config.logprob_chains} chains or samples); the server lists at most {self.max_listed_log_probs} "
                                    "(ask for fewer alternatives, samples or tokens)")
        return None

    def load_api_keys(self) -> list[bytes]:
        """Every accepted API key (SEA_API_KEYS plus the keys file) as bytes, for constant-time comparison."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_file:
            with open(self.api_keys_file, encoding="utf-8") as lines:
                from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:  # fail closed: a keys file that was meant to guard the service must not turn auth off
                raise ValueError(f"SEA_API_KEYS_FILE {self.api_keys_file} holds no keys")
            keys += from_file
        return [key.encode() for key in keys]

    def reward_terms(self) -> list[tuple[str, float]]:
        """The default reward as (name, weight) pairs."""
        return parse_reward_spec(self.reward)


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``SEA_`` environment variables that name no setting (a misspelt SEA_API_KEYS would leave the API open), each
    as a sentence naming the closest setting's variable when one is close."""
    known = [f"SEA_{name.upper()}" for name in Settings.model_fields]
    unknown = []
    for variable in sorted(environ):
        if variable.upper().startswith("SEA_") and variable.upper() not in known:
            close = difflib.get_close_matches(variable.upper(), known, n=1)
            unknown.append(f"{variable} is not a setting" + (f" (did you mean {close[0]}?)" if close else "") + "; ignored")
    return unknown


def risky_settings(settings: Settings) -> list[str]:
    """Warnings about settings that open the service wider than an operator may mean: listening beyond this machine
    without API keys (a Kubernetes Secret that is missing or misnamed leaves ``SEA_API_KEYS`` unset: the API starts
    open), and CORS allowing the origin ``null`` (any sandboxed iframe or local file sends it)."""
    warnings = []
    try:
        local = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a name, not an address
        local = settings.host == "localhost"
    if not local and not settings.load_api_keys():
        warnings.append(f"listening on {settings.host} without API keys (SEA_API_KEYS, SEA_API_KEYS_FILE): anyone who "
                        f"reaches port {settings.port} can run jobs")
    if "null" in settings.cors_origins:
        warnings.append("SEA_CORS_ORIGINS allows the origin 'null': any site's sandboxed iframe or a local file sends it")
    return warnings


MAX_REWARD_WEIGHT = 1000  # the largest weight of a reward term, here and in a request


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"principle:1,rm:0.5"`` → ``[("principle", 1.0), ("rm", 0.5)]``; a ValueError for a spec a reward cannot be
    built from (no term, a nameless term, a weight that is not a finite number within ±1000)."""
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"the weight of {part!r} is not a number") from None
        if not name.strip() or not math.isfinite(value) or abs(value) > MAX_REWARD_WEIGHT:
            raise ValueError(f"{part!r}: write name[:weight] with a finite weight within ±{MAX_REWARD_WEIGHT:g}")
        terms.append((name.strip(), value))
    if not terms:
        raise ValueError("name at least one reward, e.g. `principle`")
    return terms


def settings_markdown() -> str:
    """The settings as a Markdown table (kept in the README; a test checks it is current)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if isinstance(default, list):
            default = ",".join(default)
        shown = "(long text)" if isinstance(default, str) and len(default) > 40 else f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `SEA_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m app.settings: print the settings table; with README.md: rewrite the README's
    import re
    import sys
    from pathlib import Path

    if len(sys.argv) < 2:
        print(settings_markdown())
        sys.exit(0)
    readme = Path(sys.argv[1])
    block = f"<!-- settings-table:start -->\n{settings_markdown()}\n<!-- settings-table:end -->"
    pattern = r"<!-- settings-table:start -->.*?<!-- settings-table:end -->"
    readme.write_text(re.sub(pattern, lambda _: block, readme.read_text(), flags=re.DOTALL))
