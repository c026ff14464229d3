#!/usr/bin/env python3
"""Probe the local llama-cpp-python servers started by ``scripts/models start``.

Standard library only. Sub-commands:

  fixtures  save real replies into tests/fixtures/llamacpp/
  logprobs  run the prompt set at temperature 0 on both models, grade the
            answers and print logprob statistics (markdown table + JSON)
  latency   32-token generation time and streaming TTFT per model
  concurrency  two simultaneous requests on one server; client disconnect

Ports follow scripts/models (CASCADE_SMOLLM2_PORT=8091, CASCADE_QWEN05_PORT=8092).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llamacpp"
HOST = os.environ.get("CASCADE_MODELS_HOST", "127.0.0.1")
SERVERS = {
    "smollm2-135m": int(os.environ.get("CASCADE_SMOLLM2_PORT", "8091")),
    "qwen2.5-0.5b": int(os.environ.get("CASCADE_QWEN05_PORT", "8092")),
}


def post(port, path, body, timeout=300):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, raw


def get(port, path):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, raw


def chat(port, messages, **kw):
    body = {"model": "x", "messages": messages, "temperature": 0}
    body.update(kw)
    st, raw = post(port, "/v1/chat/completions", body)
    if st != 200:
        raise RuntimeError(f"HTTP {st}: {raw[:300]!r}")
    return json.loads(raw)


def stream(port, body, on_payload=None):
    """POST a streaming request; return (list of raw data payloads, ttft, total)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    payloads, ttft, raw_lines = [], None, []
    while True:
        line = r.readline()
        if not line:
            break
        raw_lines.append(line)
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data = line[5:].lstrip().decode()
            if ttft is None and data != "[DONE]":
                try:
                    d = json.loads(data)
                    if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
                        ttft = time.perf_counter() - t0
                except ValueError:
                    pass
            payloads.append(data)
            if on_payload and on_payload(data) is False:
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return payloads, ttft, time.perf_counter() - t0, raw_lines
    conn.close()
    return payloads, ttft, time.perf_counter() - t0, raw_lines


# --------------------------------------------------------------------------- fixtures


def cmd_fixtures(_args):
    FIXTURES.mkdir(parents=True, exist_ok=True)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    written = []
    for alias, port in SERVERS.items():
        st, raw = get(port, "/v1/models")
        (FIXTURES / f"models.{alias}.json").write_text(json.dumps(json.loads(raw), indent=2) + "\n")
        written.append(f"models.{alias}.json")

        req = {
            "model": alias,
            "messages": msgs,
            "temperature": 0,
            "max_tokens": 16,
            "logprobs": True,
            "top_logprobs": 2,
        }
        st, raw = post(port, "/v1/chat/completions", req)
        (FIXTURES / f"chat_logprobs.{alias}.json").write_text(
            json.dumps(json.loads(raw), indent=2, ensure_ascii=False) + "\n"
        )
        written.append(f"chat_logprobs.{alias}.json")

        req = {
            "model": alias,
            "messages": msgs,
            "temperature": 0,
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payloads, _, _, raw_lines = stream(port, req)
        (FIXTURES / f"chat_stream.{alias}.json").write_text(
            json.dumps(payloads, indent=2, ensure_ascii=False) + "\n"
        )
        (FIXTURES / f"chat_stream.{alias}.sse").write_bytes(b"".join(raw_lines))
        written += [f"chat_stream.{alias}.json", f"chat_stream.{alias}.sse"]

        req = {
            "model": alias,
            "messages": msgs,
            "temperature": 0,
            "max_tokens": 16,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 2,
            "stream_options": {"include_usage": True},
        }
        payloads, _, _, _ = stream(port, req)
        (FIXTURES / f"chat_stream_logprobs.{alias}.json").write_text(
            json.dumps(payloads, indent=2, ensure_ascii=False) + "\n"
        )
        written.append(f"chat_stream_logprobs.{alias}.json")

    port = SERVERS["smollm2-135m"]
    # A validation error (messages must be a list): llama-cpp-python answers 500, not 422.
    st, raw = post(port, "/v1/chat/completions", {"model": "x", "messages": "hi", "max_tokens": 4})
    (FIXTURES / "error_500_validation.json").write_text(
        json.dumps({"status": st, "body": json.loads(raw)}, indent=2) + "\n"
    )
    written.append("error_500_validation.json")
    # Quirk: no "messages" at all is accepted (200, generates from an empty chat);
    # the reply echoes the requested model name, whatever it is.
    st, raw = post(
        port, "/v1/chat/completions", {"model": "no-such-model", "max_tokens": 8, "temperature": 0}
    )
    (FIXTURES / "quirk_missing_messages_200.json").write_text(
        json.dumps({"status": st, "body": json.loads(raw)}, indent=2) + "\n"
    )
    written.append("quirk_missing_messages_200.json")
    # Over-long prompt (n_ctx 2048).
    long = "hello " * 3000
    st, raw = post(
        port,
        "/v1/chat/completions",
        {"model": "x", "messages": [{"role": "user", "content": long}], "max_tokens": 4},
    )
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    (FIXTURES / "error_context_overflow.json").write_text(
        json.dumps({"status": st, "body": body}, indent=2) + "\n"
    )
    written.append("error_context_overflow.json")
    print("\n".join(written))


# --------------------------------------------------------------------------- logprobs

# (prompt, regex that a correct answer matches, category)
PROMPTS = [
    ("What is the capital of France? Answer in one word.", r"\bparis\b", "fact"),
    ("What is the capital of Germany? Answer in one word.", r"\bberlin\b", "fact"),
    ("What is the capital of Italy? Answer in one word.", r"\brome\b", "fact"),
    ("What is the capital of Japan? Answer in one word.", r"\btokyo\b", "fact"),
    ("What is the capital of Spain? Answer in one word.", r"\bmadrid\b", "fact"),
    ("What is the capital of Australia? Answer in one word.", r"\bcanberra\b", "fact"),
    ("What is the capital of Canada? Answer in one word.", r"\bottawa\b", "fact"),
    ("What is the largest planet in the solar system? One word.", r"\bjupiter\b", "fact"),
    ("Which planet is known as the Red Planet? One word.", r"\bmars\b", "fact"),
    ("What is the chemical symbol for gold? Answer with the symbol only.", r"\bau\b", "fact"),
    ("What is the chemical symbol for sodium? Answer with the symbol only.", r"\bna\b", "fact"),
    ("How many legs does a spider have? Answer with the number only.", r"\b(8|eight)\b", "fact"),
    ("How many days are in a week? Answer with the number only.", r"\b(7|seven)\b", "fact"),
    ("What is the opposite of hot? One word.", r"\bcold\b", "fact"),
    ("What colour is the sky on a clear day? One word.", r"\bblue\b", "fact"),
    ("What colour do you get by mixing blue and yellow? One word.", r"\bgreen\b", "fact"),
    ("What colour do you get by mixing red and white? One word.", r"\bpink\b", "fact"),
    ("Who wrote Romeo and Juliet? Answer with the name only.", r"shakespeare", "fact"),
    ("What is 2+2? Answer with the number only.", r"\b4\b", "math"),
    ("What is 3+5? Answer with the number only.", r"\b8\b", "math"),
    ("What is 10-3? Answer with the number only.", r"\b7\b", "math"),
    ("What is 9*9? Answer with the number only.", r"\b81\b", "math"),
    ("What is 12*12? Answer with the number only.", r"\b144\b", "math"),
    ("What is 17*24? Answer with the number only.", r"\b408\b", "math"),
    ("What is 23*19? Answer with the number only.", r"\b437\b", "math"),
    ("What is 156+287? Answer with the number only.", r"\b443\b", "math"),
    ("What is 1000-367? Answer with the number only.", r"\b633\b", "math"),
    ("What is 144 divided by 12? Answer with the number only.", r"\b12\b", "math"),
    ("What is the square root of 81? Answer with the number only.", r"\b9\b", "math"),
    ("Is 17 a prime number? Answer yes or no.", r"\byes\b", "math"),
    ("Is 21 a prime number? Answer yes or no.", r"\bno\b", "math"),
    ("What is the next number in the sequence 2, 4, 8, 16? Answer with the number only.", r"\b32\b", "math"),
    ("Which Python keyword defines a function? Answer with the keyword only.", r"\bdef\b", "code"),
    ("What does len([1, 2, 3]) return in Python? Answer with the value only.", r"\b3\b", "code"),
    ("What does 7 // 2 evaluate to in Python? Answer with the value only.", r"\b3\b", "code"),
    ("What does 2 ** 10 evaluate to in Python? Answer with the value only.", r"\b1024\b", "code"),
    ("What does 'abc'.upper() return in Python? Answer with the value only.", r"(?-i:\bABC\b)", "code"),
    ("In SQL, which keyword removes duplicate rows from a SELECT? One word.", r"\bdistinct\b", "code"),
    (
        "If Tom is taller than Ann and Ann is taller than Bob, who is the shortest? One word.",
        r"\bbob\b",
        "reason",
    ),
    (
        "A farmer has 15 sheep and all but 8 run away. How many are left? Answer with the number only.",
        r"\b8\b",
        "reason",
    ),
    ("How many months have 28 days? Answer with the number only.", r"\b12\b", "reason"),
    ("What is the plural of 'mouse'? One word.", r"\bmice\b", "lang"),
    ("What is the past tense of 'go'? One word.", r"\bwent\b", "lang"),
    ("Translate 'thank you' into French.", r"merci", "lang"),
]


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(content):
    lps = [t["logprob"] for t in content]
    ps = [math.exp(x) for x in lps]
    if not ps:
        return {}
    return {
        "n": len(ps),
        "mean_p": sum(ps) / len(ps),
        "geo_p": math.exp(sum(lps) / len(lps)),
        # nearest-rank 10th percentile, as app/scoring/logprob.py computes it
        "p10_p": sorted(ps)[max(0, math.ceil(0.10 * len(ps)) - 1)],
        "min_p": min(ps),
        "first_p": ps[0],
        # margin between the chosen token and the runner-up on the first token
        "first_margin": (ps[0] - math.exp(content[0]["top_logprobs"][1]["logprob"]))
        if len(content[0].get("top_logprobs") or []) > 1
        else None,
    }


def cmd_logprobs(args):
    rows = []
    for prompt, pattern, cat in PROMPTS:
        row = {"prompt": prompt, "category": cat}
        for alias, port in SERVERS.items():
            r = chat(
                port,
                [{"role": "user", "content": prompt}],
                max_tokens=args.max_tokens,
                logprobs=True,
                top_logprobs=2,
            )
            ch = r["choices"][0]
            text = ch["message"]["content"] or ""
            content = (ch.get("logprobs") or {}).get("content") or []
            ok = re.search(pattern, text, re.I) is not None
            row[alias] = {
                "answer": text,
                "correct": ok,
                "finish": ch.get("finish_reason"),
                **stats(content),
                "tokens": [t["token"] for t in content],
                "probs": [round(math.exp(t["logprob"]), 5) for t in content],
            }
        rows.append(row)
        s = row["smollm2-135m"]
        q = row["qwen2.5-0.5b"]
        print(
            f"[{cat}] {prompt[:60]!r}: 135m={s['answer'][:30]!r} ok={s['correct']} "
            f"mean={s.get('mean_p', 0):.2f} p10={s.get('p10_p', 0):.2f} | "
            f"0.5b={q['answer'][:30]!r} ok={q['correct']}",
            file=sys.stderr,
            flush=True,
        )
    out = Path(args.out)
    out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)


# --------------------------------------------------------------------------- latency


def cmd_latency(args):
    prompt = [{"role": "user", "content": "Write a long story about a cat who learns to sail."}]
    res = {}
    for alias, port in SERVERS.items():
        # warm-up
        chat(port, prompt, max_tokens=4)
        totals, ttfts, stotals, ntoks = [], [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = chat(port, prompt, max_tokens=32)
            totals.append(time.perf_counter() - t0)
            ntoks.append(r["usage"]["completion_tokens"])
            _payloads, ttft, total, _ = stream(
                port, {"model": alias, "messages": prompt, "temperature": 0, "max_tokens": 32, "stream": True}
            )
            ttfts.append(ttft)
            stotals.append(total)
        # logprobs overhead
        t0 = time.perf_counter()
        chat(port, prompt, max_tokens=32, logprobs=True, top_logprobs=2)
        lp = time.perf_counter() - t0
        res[alias] = {
            "nonstream_32tok_s": sorted(totals)[len(totals) // 2],
            "completion_tokens": ntoks,
            "stream_ttft_s": sorted(ttfts)[len(ttfts) // 2],
            "stream_total_s": sorted(stotals)[len(stotals) // 2],
            "tok_per_s": 32 / sorted(totals)[len(totals) // 2],
            "with_logprobs_32tok_s": lp,
            "all_nonstream": totals,
            "all_ttft": ttfts,
        }
        print(alias, json.dumps(res[alias], indent=1))
    return res


# --------------------------------------------------------------------------- concurrency


def cmd_concurrency(args):
    """Two requests 0.3 s apart on one server (stream/non-stream mixes), then client
    disconnects. Run it against a server started with and without
    --interrupt_requests False to see the difference."""
    port = args.port or SERVERS["smollm2-135m"]
    prompt = [{"role": "user", "content": "Write a very long story about a cat who learns to sail."}]
    n = args.tokens
    t = time.perf_counter()
    chat(port, prompt, max_tokens=n)
    base = time.perf_counter() - t
    print(f"baseline {n} tokens non-stream: {base:.2f}s")

    def run(kind, name, delay, out, t0):
        time.sleep(delay)
        sent = time.perf_counter() - t0
        try:
            if kind == "stream":
                body = {"model": "x", "messages": prompt, "temperature": 0, "max_tokens": n, "stream": True}
                payloads, ttft, _total, _ = stream(port, body)
                chunks = [json.loads(x) for x in payloads if x != "[DONE]"]
                finish = [
                    c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
                ]
                ntok = sum(1 for c in chunks if c["choices"][0]["delta"].get("content"))
                first = sent + ttft if ttft else -1
                out[name] = (
                    f"stream    sent@{sent:.2f} first@{first:.2f} done@{time.perf_counter() - t0:.2f} "
                    f"content_chunks={ntok} finish={finish} last={payloads[-1]!r}"
                )
            else:
                r = chat(port, prompt, max_tokens=n)
                out[name] = (
                    f"nonstream sent@{sent:.2f} done@{time.perf_counter() - t0:.2f} "
                    f"tokens={r['usage']['completion_tokens']} finish={r['choices'][0]['finish_reason']}"
                )
        except Exception as e:
            out[name] = f"{kind} sent@{sent:.2f} ERROR {e!r} at {time.perf_counter() - t0:.2f}"

    for a_kind, b_kind in [("nonstream", "nonstream"), ("stream", "nonstream"), ("stream", "stream")]:
        out = {}
        t0 = time.perf_counter()
        ts = [
            threading.Thread(target=run, args=(a_kind, "A", 0, out, t0)),
            threading.Thread(target=run, args=(b_kind, "B", 0.3, out, t0)),
        ]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        print(f"A={a_kind}, B={b_kind} 0.3 s later\n   A: {out['A']}\n   B: {out['B']}")

    # Stream disconnect after 3 chunks: does generation stop?
    count = {"n": 0}

    def on_payload(_data):
        count["n"] += 1
        return count["n"] < 4

    body = {"model": "x", "messages": prompt, "temperature": 0, "max_tokens": n, "stream": True}
    stream(port, body, on_payload)
    t1 = time.perf_counter()
    chat(port, [{"role": "user", "content": "Say OK."}], max_tokens=1)
    print(f"stream dropped after 3 chunks: next 1-token request waited {time.perf_counter() - t1:.2f}s")

    # Non-stream: the client gives up after 0.5 s.
    conn = http.client.HTTPConnection(HOST, port, timeout=0.5)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "x", "messages": prompt, "temperature": 0, "max_tokens": n}).encode(),
        {"Content-Type": "application/json"},
    )
    with contextlib.suppress(OSError):
        conn.getresponse()
    conn.close()
    t1 = time.perf_counter()
    chat(port, [{"role": "user", "content": "Say OK."}], max_tokens=1)
    print(
        f"non-stream abandoned after 0.5 s: next 1-token request waited {time.perf_counter() - t1:.2f}s "
        f"(whole generation ~{base:.2f}s)"
    )


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fixtures").set_defaults(fn=cmd_fixtures)
    p = sub.add_parser("logprobs")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default="/tmp/llamacpp-logprobs.json")
    p.set_defaults(fn=cmd_logprobs)
    p = sub.add_parser("latency")
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=cmd_latency)
    p = sub.add_parser("concurrency")
    p.add_argument("--port", type=int)
    p.add_argument("--tokens", type=int, default=200)
    p.set_defaults(fn=cmd_concurrency)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
