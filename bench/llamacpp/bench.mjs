// llama.cpp single-stream generation on a GGUF: the outside reference for bench/inference.py.
//
//   cd bench/llamacpp && npm ci      # once; .npmrc: no install scripts, no optional packages
//   node bench/llamacpp/bench.mjs --model FILE.gguf [--prompt TEXT] [--tokens 48] [--repeats 5]
//                                 [--threads 2] [--context 1024]
//
// llama.cpp is the prebuilt CPU binary of node-llama-cpp 3.21.1 (@node-llama-cpp/linux-x64):
// getLlama({gpu: false, build: "never", skipDownload: true}) uses it or fails; it never downloads
// or builds llama.cpp (NODE_LLAMA_CPP_SKIP_DOWNLOAD is set too, for anything that reads it).
//
// The prompt is one user message put through the GGUF's own chat template (its Jinja
// tokenizer.chat_template, add_generation_prompt), as ForgeLLM and mlx-lm do with the same
// template, tokenized with special tokens. Greedy (temperature 0), one sequence, a fresh KV cache
// for each repeat (after one untimed warm-up). Timing, as in bench/inference.py:
//   ttft = from the call (template + tokenize + prefill) to the first non-empty text in hand;
//   tps  = generated tokens (EOS not counted) / the whole call, prefill included;
//   decode_tps = tokens after the first / the time after the first (the decode rate alone).
// Prints one JSON object on stdout; llama.cpp's own logs go to stderr.

import os from "node:os";
import process from "node:process";
import {parseArgs} from "node:util";

process.env.NODE_LLAMA_CPP_SKIP_DOWNLOAD = "true";
process.env.NODE_LLAMA_CPP_GPU = "false";

const {Template} = await import("@huggingface/jinja");
const {getLlama, LlamaLogLevel} = await import("node-llama-cpp");

const DEFAULT_PROMPT = "Tell me a long story about a dragon who learns to read."; // bench/inference.py PROMPT

const {values: opt} = parseArgs({
    options: {
        model: {type: "string"},
        prompt: {type: "string", default: DEFAULT_PROMPT},
        tokens: {type: "string", default: "48"},
        repeats: {type: "string", default: "5"},
        threads: {type: "string", default: "2"},
        context: {type: "string", default: "1024"}
    }
});
if (!opt.model) {
    console.error("usage: node bench.mjs --model FILE.gguf [--prompt TEXT] [--tokens 48] [--repeats 5] [--threads 2]");
    process.exit(2);
}
const maxTokens = Number(opt.tokens), repeats = Number(opt.repeats), threads = Number(opt.threads);

const started = performance.now();
const llama = await getLlama({
    gpu: false,
    build: "never",
    skipDownload: true,
    usePrebuiltBinaries: true,
    progressLogs: false,
    maxThreads: threads,
    logLevel: LlamaLogLevel.error
});
const model = await llama.loadModel({modelPath: opt.model, gpuLayers: 0});
const context = await model.createContext({
    contextSize: Number(opt.context),
    sequences: 1,
    threads: {ideal: threads, min: threads}
});
const loadS = (performance.now() - started) / 1000;

const meta = model.fileInfo.metadata;
const template = meta?.tokenizer?.chat_template;
if (typeof template !== "string")
    throw new Error(`${opt.model} has no tokenizer.chat_template`);
const special = (id) => (id == null ? "" : model.detokenize([id], true));

function promptText(message) {
    return new Template(template).render({
        messages: [{role: "user", content: message}],
        add_generation_prompt: true,
        bos_token: special(meta.tokenizer.ggml?.bos_token_id),
        eos_token: special(meta.tokenizer.ggml?.eos_token_id)
    });
}

async function generate(message, limit) {
    const sequence = context.getSequence();
    try {
        const t0 = performance.now();
        const input = model.tokenize(promptText(message), true);
        const out = [];
        let first = null, text = "";
        for await (const token of sequence.evaluate(input, {temperature: 0})) {
            if (model.isEogToken(token))
                break;
            out.push(token);
            if (first == null) {
                text = model.detokenize(out);
                if (text.length > 0)
                    first = performance.now();
            }
            if (out.length >= limit)
                break;
        }
        const end = performance.now();
        const firstTokenAt = first ?? end;
        return {
            prompt_tokens: input.length,
            tokens: out.length,
            ttft: (firstTokenAt - t0) / 1000,
            tps: out.length / ((end - t0) / 1000),
            decode_tps: out.length > 1 ? (out.length - 1) / ((end - firstTokenAt) / 1000) : null,
            text: model.detokenize(out)
        };
    } finally {
        sequence.dispose();
    }
}

const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b), m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

await generate(opt.prompt, 4); // warm-up: first-call allocations, page cache
const runs = [];
for (let i = 0; i < repeats; i++)
    runs.push(await generate(opt.prompt, maxTokens));

const result = {
    engine: "llama.cpp",
    binding: "node-llama-cpp 3.21.1, prebuilt @node-llama-cpp/linux-x64 (CPU)",
    llama_cpp_release: llama.llamaCppRelease?.release ?? null,
    build_type: llama.buildType,
    gpu: llama.gpu,
    cpu_cores: os.cpus().length,
    threads,
    context_size: context.contextSize,
    model: opt.model,
    model_size_mb: Math.round(model.size / 2 ** 20),
    load_s: loadS,
    max_tokens: maxTokens,
    repeats,
    prompt: opt.prompt,
    prompt_tokens: runs[0].prompt_tokens,
    tokens: median(runs.map((r) => r.tokens)),
    tps: median(runs.map((r) => r.tps)),
    ttft_ms: median(runs.map((r) => r.ttft)) * 1000,
    decode_tps: median(runs.filter((r) => r.decode_tps != null).map((r) => r.decode_tps)),
    tps_all: runs.map((r) => Math.round(r.tps * 100) / 100),
    ttft_ms_all: runs.map((r) => Math.round(r.ttft * 1000)),
    text: runs[0].text,
    load_average: os.loadavg()
};
await context.dispose();
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(result) + "\n");
