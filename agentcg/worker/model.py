"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Weights are plain tensors (no nn.Module): a random model is initialised
directly on its device (an 8B shape in bf16 is 16 GB: built on the GPU in
seconds), a checkpoint is read tensor by tensor from its safetensors files.

Shapes: T tokens of a step (all sequences flattened), Hq query heads,
H kv heads, D head dim, G = Hq // H.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from agentcg.worker.rope import inv_frequencies
from agentcg.worker.shapes import ModelShape, get_shape, shape_from_hf_config

Progress = Callable[[str], None] | None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
             "fp64": torch.float64, "float64": torch.float64}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} not understood; use one of {', '.join(table)}") from None


class Llama:
    def __init__(self, shape: ModelShape, weights: dict, device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.w = weights
        self.device = device
        self.dtype = dtype
        self._cos = self._sin = None

    # ---------------------------------------------------------------- build
    @classmethod
    def random(cls, shape: ModelShape, device: torch.device, dtype: torch.dtype,
               seed: int = 0, progress: Progress = None) -> "Llama":
        shape.validate()
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        hd, dim = shape.head_dim, shape.dim

        def mat(rows: int, cols: int) -> torch.Tensor:
            t = torch.empty(rows, cols, device=device, dtype=dtype)
            return t.normal_(0.0, 1.0 / math.sqrt(cols), generator=g)

        def norm() -> torch.Tensor:
            return torch.ones(dim, device=device, dtype=dtype)

        w: dict = {"layers": []}
        w["emb"] = torch.empty(shape.vocab_size, dim, device=device, dtype=dtype).normal_(0, 1, generator=g)
        for i in range(shape.n_layers):
            w["layers"].append({
                "wqkv": mat((shape.n_heads + 2 * shape.n_kv_heads) * hd, dim),   # [(Hq+2H)*D, dim]
                "wo": mat(dim, shape.n_heads * hd),                               # [dim, Hq*D]
                "wgu": mat(2 * shape.ffn_dim, dim),                               # [2*ffn, dim]
                "wd": mat(dim, shape.ffn_dim),                                    # [dim, ffn]
                "n1": norm(), "n2": norm(),
            })
            if progress and (i + 1) % 8 == 0:
                progress(f"initialised layer {i + 1}/{shape.n_layers}")
        w["norm"] = norm()
        w["head"] = w["emb"] if shape.tie_embeddings else mat(shape.vocab_size, dim)
        return cls(shape, w, device, dtype)

    @classmethod
    def from_checkpoint(cls, directory: Path, device: torch.device, dtype: torch.dtype,
                        progress: Progress = None) -> "Llama":
        from safetensors import safe_open

        directory = Path(directory)
        shape = shape_from_hf_config(directory / "config.json")
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files")
        raw: dict[str, torch.Tensor] = {}
        for n, f in enumerate(files, 1):
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    raw[key] = fh.get_tensor(key).to(device=device, dtype=dtype)
            if progress:
                progress(f"loaded {f.name} ({n}/{len(files)})")

        def take(key: str) -> torch.Tensor:
            try:
                return raw.pop(key)
            except KeyError:
                raise ValueError(f"{directory}: checkpoint lacks tensor {key!r}") from None

        w: dict = {"layers": [], "emb": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
        for i in range(shape.n_layers):
            p = f"model.layers.{i}."
            w["layers"].append({
                "wqkv": torch.cat([take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"),
                                   take(p + "self_attn.v_proj.weight")]),
                "wo": take(p + "self_attn.o_proj.weight"),
                "wgu": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                "wd": take(p + "mlp.down_proj.weight"),
                "n1": take(p + "input_layernorm.weight"),
                "n2": take(p + "post_attention_layernorm.weight"),
            })
        w["head"] = w["emb"] if shape.tie_embeddings else raw.pop("lm_head.weight", w["emb"])
        return cls(shape, w, device, dtype)

    @classmethod
    def load(cls, model: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
             progress: Progress = None) -> "Llama":
        """A named shape (random weights) or a checkpoint directory."""
        path = Path(model)
        if (path / "config.json").exists():
            return cls.from_checkpoint(path, device, dtype, progress)
        if path.exists():
            raise ValueError(f"{model}: directory has no config.json")
        return cls.random(get_shape(model), device, dtype, seed, progress)

    def weight_bytes(self) -> int:
        n = sum(t.numel() for lw in self.w["layers"] for t in lw.values())
        n += self.w["emb"].numel() + self.w["norm"].numel()
        if self.w["head"] is not self.w["emb"]:
            n += self.w["head"].numel()
        return n * self.w["emb"].element_size()

    # ---------------------------------------------------------------- parts
    def _rope_tables(self, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < max_pos:
            n = max(max_pos, 4096)
            hd = self.shape.head_dim
            inv = torch.tensor(inv_frequencies(hd, self.shape.rope_theta, self.shape.rope_scaling),
                               device=self.device, dtype=torch.float64)
            f = torch.outer(torch.arange(n, device=self.device, dtype=torch.float64), inv)
            emb = torch.cat([f, f], dim=-1)                       # [n, D]
            self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self._cos, self._sin

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; cos/sin: [T, 1, D]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:       # fused kernel, fp32 accumulation
            return F.rms_norm(x, (x.shape[-1],), w, self.shape.norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.shape.norm_eps)
        return xf.to(x.dtype) * w

    def _qkv(self, lw: dict, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        s = self.shape
        hd = s.head_dim
        qkv = self._norm(x, lw["n1"]) @ lw["wqkv"].T          # [T, (Hq+2H)*D]
        T = x.shape[0]
        qk = qkv[:, :(s.n_heads + s.n_kv_heads) * hd].view(T, s.n_heads + s.n_kv_heads, hd)
        v = qkv[:, (s.n_heads + s.n_kv_heads) * hd:].view(T, s.n_kv_heads, hd)
        qk = self._rope(qk, *rope)                               # queries and keys in one pass
        return qk[:, :s.n_heads], qk[:, s.n_heads:], v

    def _rope_for(self, pos: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope_tables(max_pos + 1)
        return cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)           # [T, 1, D] each

    def _mlp(self, lw: dict, x: torch.Tensor) -> torch.Tensor:
        gu = self._norm(x, lw["n2"]) @ lw["wgu"].T            # [T, 2*ffn]
        g, u = gu.chunk(2, dim=-1)
        return (F.silu(g) * u) @ lw["wd"].T

    def _causal_attn(self, q, k, v) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, H, D] of one sequence from position 0 -> [T, Hq*D]."""
        G = self.shape.group
        qt = q.transpose(0, 1)                                       # [Hq, T, D]
        kt = k.transpose(0, 1).repeat_interleave(G, dim=0)           # [Hq, T, D]
        vt = v.transpose(0, 1).repeat_interleave(G, dim=0)
        # 4-D [1, Hq, T, D] so that the fused (flash) kernels apply
        o = F.scaled_dot_product_attention(qt[None], kt[None], vt[None], is_causal=True)[0]
        return o.transpose(0, 1).reshape(q.shape[0], -1)

    # ------------------------------------------------------------ reference
    @torch.inference_mode()
    def reference_forward(self, ids: list[int]) -> torch.Tensor:
        """Plain forward of one sequence, no cache: -> logits [T, vocab] fp32."""
        x = self.w["emb"][torch.tensor(ids, device=self.device)]
        rope = self._rope_for(torch.arange(len(ids), device=self.device), len(ids))
        for lw in self.w["layers"]:
            q, k, v = self._qkv(lw, x, rope)
            x = x + self._causal_attn(q, k, v) @ lw["wo"].T
            x = x + self._mlp(lw, x)
        return (self._norm(x, self.w["norm"]) @ self.w["head"].T).float()

    # ---------------------------------------------------------------- paged
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, batch, kv) -> torch.Tensor:
        """One step over a paged cache.

        ids, pos: [T]. batch (see runner.StepBatch): decode tokens first
        (batch.num_decode of them), then prefill spans. kv: kv_torch.KVPool.
        Returns logits [len(batch.logits_idx), vocab] fp32.
        """
        x = self.w["emb"][ids]                                   # [T, dim]
        rope = self._rope_for(pos, batch.max_pos)
        for layer, lw in enumerate(self.w["layers"]):
            q, k, v = self._qkv(lw, x, rope)
            batch.wait_layer(layer)
            kv.write(layer, batch.write_plan, k, v)
            if batch.num_decode == q.shape[0]:       # decode only: no assembly copy
                o = self._decode_attn(layer, q, batch, kv)
            else:
                o = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
            if batch.num_decode and batch.num_decode < q.shape[0]:
                o[:batch.num_decode] = self._decode_attn(layer, q[:batch.num_decode], batch, kv)
            for sp in batch.prefills:
                t0, t1 = sp.t0, sp.t1
                if sp.ctx_len == t1 - t0:       # no cached prefix: attend to local K/V
                    o[t0:t1] = self._causal_attn(q[t0:t1], k[t0:t1], v[t0:t1])
                else:
                    o[t0:t1] = self._prefix_attn(layer, q[t0:t1], sp, kv)
            x = x + o @ lw["wo"].T
            x = x + self._mlp(lw, x)
        x = x.index_select(0, batch.logits_idx)
        return (self._norm(x, self.w["norm"]) @ self.w["head"].T).float()

    def _decode_attn(self, layer: int, q: torch.Tensor, batch, kv) -> torch.Tensor:
        """q: [B, Hq, D], one new token per sequence -> [B, Hq*D]."""
        B, Hq, D = q.shape
        H, G, bs = self.shape.n_kv_heads, self.shape.group, kv.bs
        g = kv.gather(layer, batch.decode_gather)               # [B*nb, 2, bs, H, D]
        nb = g.shape[0] // B
        g = g.view(B, nb, 2, bs, H, D).permute(0, 2, 4, 1, 3, 5).reshape(B, 2, H, nb * bs, D)
        qg = q.view(B, H, G, D)                                  # query heads grouped by kv head
        o = F.scaled_dot_product_attention(qg, g[:, 0], g[:, 1], attn_mask=batch.decode_mask)
        return o.reshape(B, Hq * D)                              # [B, H, G, D] -> [B, Hq*D]

    def _prefix_attn(self, layer: int, q: torch.Tensor, sp, kv) -> torch.Tensor:
        """q: [n, Hq, D], new tokens at positions ctx-n..ctx-1 of a sequence
        whose first ctx tokens are in the cache -> [n, Hq*D]."""
        n, Hq, D = q.shape
        H, G, bs = self.shape.n_kv_heads, self.shape.group, kv.bs
        g = kv.gather(layer, sp.gather)                          # [nb, 2, bs, H, D]
        nb = g.shape[0]
        kvt = g.permute(1, 3, 0, 2, 4).reshape(2, H, nb * bs, D)[:, :, :sp.ctx_len]
        qg = q.view(n, H, G, D).permute(1, 2, 0, 3)              # [H, G, n, D]
        out = torch.empty(H, G, n, D, dtype=q.dtype, device=q.device)
        p0 = sp.ctx_len - n
        keys = torch.arange(sp.ctx_len, device=q.device)
        step = max(1, (64 << 20) // max(1, G * sp.ctx_len))      # bound the mask size
        for a in range(0, n, step):
            b = min(n, a + step)
            qpos = torch.arange(p0 + a, p0 + b, device=q.device)
            mask = (keys.unsqueeze(0) <= qpos.unsqueeze(1)).repeat(G, 1)   # [G*(b-a), ctx]
            qc = qg[:, :, a:b].reshape(H, G * (b - a), D)        # group folded into the query axis
            o = F.scaled_dot_product_attention(qc[None], kvt[0][None], kvt[1][None], attn_mask=mask)[0]
            out[:, :, a:b] = o.view(H, G, b - a, D)
        return out.permute(2, 0, 1, 3).reshape(n, Hq * D)
