"""Every server option, defined once: CLI flag, EDGEVL_* environment variable, help, default, bounds.

The flags of `edgevl serve` are generated from this class and the README's table is checked
against it by a test, so the three never drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from edgevl.types import EngineOptions, KVCache, Precision


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEVL_", extra="ignore")

    # -- where and what
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server (see SECURITY.md)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    model: str | None = Field(None, description="Qwen3-VL checkpoint or exported folder (default: the demo model)")
    precision: Precision = Field("fp32", description="weights used when exporting a checkpoint")
    kv_cache: KVCache = Field("fp32", description="KV cache elements when exporting a checkpoint: int8 holds a "
                              "quarter of fp32's memory per token and reads faster in long answers, with "
                              "fixed scales measured on calibration text (docs/quantization.md)")
    # -- CPU
    threads: int = Field(0, ge=0, le=256, description="ONNX Runtime threads per graph, shared by the whole batch "
                                                      "(0: one per physical core)")
    inter_op_threads: int = Field(1, ge=1, le=64, description="inter-op threads (parallel execution mode only)")
    execution_mode: Literal["sequential", "parallel"] = Field("sequential", description="ONNX Runtime graph execution")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level")
    max_batch: int = Field(4, ge=1, le=64, description="sequences decoding together in one batched step")
    kv_cache_mb: int = Field(2048, ge=1, description="KV cache of all sequences (MB); a request waits for its share")
    prefill_chunk: int = Field(256, ge=16, le=65536,
                               description="prompt tokens read per decoder run while no answer streams")
    step_stretch: float = Field(1.2, ge=1.0, le=100.0,
                                description="how much longer than a plain decode step a loop step may take while "
                                "answers stream, to carry a newcomer's prompt slice in the same decoder run or a "
                                "slice of its picture through the vision tower (timed as the server runs: the "
                                "same setting holds on any CPU). Smaller: steadier streams, later first tokens")
    step_tokens: int = Field(64, ge=0, le=65536,
                             description="most work one loop step does while answers stream, in decoder tokens "
                             "(0: the newcomer's prompt chunk runs on its own, between steps)")
    start_together: bool = Field(True, description="while no answer streams, newcomers that arrive together are "
                                 "all read at full speed, then start answering together (one stream starting "
                                 "first would hold the others' reading to the step budget); a newcomer waits at most "
                                 "max-batch times its own reading time")
    jump_forward: bool = Field(True, description="tokens a JSON schema or tool call forces are checked in one "
                               "decoder run instead of one step each (same answer)")
    queue_size: int = Field(16, ge=0, le=10000, description="requests allowed to wait; beyond it: 429 at once")
    # -- limits
    request_timeout_s: float = Field(300.0, gt=0, le=86400, description="longest a request may take, queue included")
    max_body_mb: float = Field(20.0, gt=0, le=1024, description="largest request body accepted (MB)")
    max_input_pixels: int = Field(40_000_000, ge=1, description="largest image decoded at all (pixels)")
    max_pixels: int = Field(1024 * 1024, ge=1024, description="pixel budget per image for the vision encoder")
    max_images: int = Field(8, ge=1, le=64, description="images per request")
    max_videos: int = Field(2, ge=0, le=16, description="video clips per request (0: no video)")
    max_video_seconds: float = Field(60.0, gt=0, le=3600, description="longest clip accepted (seconds)")
    max_video_frames: int = Field(64, ge=2, le=768, description="frames sampled from a clip at most")
    max_video_pixels: int = Field(2 * 1024 * 1024, ge=4096,
                                  description="pixel budget per clip for the vision encoder, all frames together")
    max_decode_cpu_s: float = Field(10.0, ge=0, le=3600,
                                    description="CPU seconds a request's clips may take to decode (0: no limit)")
    max_tokens: int = Field(4096, ge=1, le=1_000_000, description="most answer tokens a request may ask for")
    default_max_tokens: int = Field(512, ge=1, description="answer tokens when a request names none")
    max_context: int = Field(8192, ge=256, le=262144, description="prompt + answer tokens per conversation")
    max_turns: int = Field(64, ge=1, le=10000, description="messages per conversation")
    vision_cache: int = Field(16, ge=0, le=100000, description="image embeddings kept for repeated images")
    prefix_cache: bool = Field(True, description="re-use the KV cache of a conversation's earlier turns")
    reasoning_budget: int = Field(-1, ge=-1, description="thinking models: thought tokens per answer at most, then "
                                  "the thought is closed (-1: no limit; 0: no thinking)")
    responses_store: int = Field(256, ge=0, le=100000,
                                 description="responses kept for previous_response_id and GET /v1/responses (0: none)")
    max_memory_mb: int = Field(0, ge=0, description="refuse to start if the model would need more (0: no check)")
    allow_remote_images: bool = Field(False, description="fetch http(s) image URLs (public addresses only)")
    allow_remote_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="image hosts fetched even at private addresses (comma-separated)")
    # -- access
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted API keys (comma-separated); none: open")
    api_key_file: str | None = Field(None, description="file with one API key per line")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (comma-separated)")
    # -- operations
    grace_period_s: float = Field(30.0, ge=0, le=3600, description="on SIGTERM, time in-flight requests get to finish")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or JSON")
    thermal_sensor: str | None = Field(None, description="temperature file (default: the hottest thermal zone)")
    thermal_soft_c: float = Field(80.0, description="above it: batch size 1 (one answer at a time)")
    thermal_hard_c: float = Field(90.0, description="above it: no new work (503) until cooled")
    thermal_hysteresis_c: float = Field(5.0, ge=0, description="cool this far below the soft limit to recover")
    thermal_poll_s: float = Field(2.0, gt=0, description="seconds between temperature reads")
    energy_counter: str | None = Field(
        None, description="CPU energy counter file in microjoules (default: the powercap package counters)")

    # -- cluster (Ray Serve; `pip install edgevl[cluster]`)
    ray: bool = Field(False, description="serve as a Ray Serve deployment instead of one process")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: start a local one)")
    ray_replicas: int = Field(1, ge=1, le=1024, description="replicas, each loading and warming the model once")
    ray_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (ray_actor_options)")
    ray_min_replicas: int = Field(0, ge=0, description="autoscaling lower bound (0 with max 0: fixed replicas)")
    ray_max_replicas: int = Field(0, ge=0, description="autoscaling upper bound (0: no autoscaling)")
    ray_max_queued_requests: int = Field(64, ge=-1, description="requests Ray holds before refusing (-1: no bound)")

    @field_validator("api_keys", "cors_origins", "allow_remote_hosts", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # checked before the model loads, so a bad combination fails in a second, not a minute
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        if self.thermal_soft_c >= self.thermal_hard_c:
            raise ValueError("thermal_soft_c must be below thermal_hard_c")
        if self.max_tokens >= self.max_context:
            self.max_tokens = self.max_context - 1
        return self

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            intra_op_threads=self.threads, inter_op_threads=self.inter_op_threads,
            execution_mode=self.execution_mode, graph_optimization=self.graph_optimization,
            precision=self.precision, kv_cache=self.kv_cache, max_context=self.max_context, max_pixels=self.max_pixels,
            max_images=self.max_images, max_video_pixels=self.max_video_pixels,
            vision_cache_entries=self.vision_cache, prefix_cache=self.prefix_cache,
            max_memory_mb=self.max_memory_mb, max_batch=self.max_batch, kv_cache_mb=self.kv_cache_mb,
            prefill_chunk=self.prefill_chunk, step_tokens=self.step_tokens,
            step_stretch=self.step_stretch, start_together=self.start_together, jump_forward=self.jump_forward,
            queue_size=self.queue_size,
            reasoning_budget=self.reasoning_budget, energy_counter=self.energy_counter)

    def all_api_keys(self) -> list[str]:
        keys = [k for k in self.api_keys if k]
        if self.api_key_file:
            with open(self.api_key_file) as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        return keys
