// llama.cpp (through node-llama-cpp, CPU build) as a JSON-lines server, for tests/test_gguf.py and
// bench/bench_llamacpp.py: one request per line on stdin, one JSON answer per line on stdout (logs go to stderr).
//
//   {"op": "init", "threads": T}          -> {"ok": true}: llama.cpp's binaries loaded (no model yet)
//   {"op": "load", "model": PATH, "contextSize": N, "threads": T, "kvType": "F32"}
//       -> {"ok": true, "kvCacheKeyType": ..., "kvCacheValueType": ..., "contextSize": ..., "threads": ...}
//          (one model at a time; flash attention off; kvType F32 or F16 for both keys and values)
//   {"op": "logits", "tokens": [ids], "vocabSize": V}
//                                         -> {"logits": [[V floats] for each position]}: the raw next-token logits
//                                            after each prefix, from a fresh KV cache
//   {"op": "tokenize", "text": TEXT}     -> {"tokens": [ids]} (special-token strings as plain text)
//   {"op": "generate", "tokens": [ids], "n": N}
//                                         -> {"tokens": [N ids], "seconds": s}: greedy (temperature 0), exactly N
//                                            new tokens (end-of-generation tokens included), from a fresh KV cache
//   {"op": "exit"}
//
// Any failure answers {"error": message}. NODE_LLAMA_CPP_DIR is the folder whose node_modules holds node-llama-cpp.

import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
if (!dir) {
    process.stdout.write(JSON.stringify({ error: "NODE_LLAMA_CPP_DIR is not set" }) + "\n");
    process.exit(2);
}
const { getLlama, LlamaLogLevel } = await import(
    pathToFileURL(join(dir, "node_modules", "node-llama-cpp", "dist", "index.js")).href);

let llama = null;
let model = null;
let context = null;
let sequence = null;

async function init(request) {
    llama ??= await getLlama({
        gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true, progressLogs: false,
        maxThreads: request.threads ?? 0, logLevel: LlamaLogLevel.error,
        logger: (level, message) => process.stderr.write(`llama.cpp ${level}: ${message}`),
    });
    return { ok: true };
}

async function load(request) {
    await init(request);
    if (context !== null) await context.dispose();
    if (model !== null) await model.dispose();
    model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
    context = await model.createContext({
        contextSize: request.contextSize, batchSize: request.contextSize, sequences: 1,
        threads: request.threads ?? 0, flashAttention: false,
        experimentalKvCacheKeyType: request.kvType ?? "F16", experimentalKvCacheValueType: request.kvType ?? "F16",
    });
    sequence = context.getSequence();
    return {
        ok: true, trainContextSize: model.trainContextSize,
        kvCacheKeyType: context.kvCacheKeyType, kvCacheValueType: context.kvCacheValueType,
        contextSize: context.contextSize, threads: context.idealThreads,
    };
}

async function logits(request) {
    await sequence.clearHistory();
    const vocabSize = request.vocabSize;
    const input = request.tokens.map((token) => [token, { generateNext: { logits: true } }]);
    const output = await sequence.controlledEvaluate(input);
    return {
        logits: output.map((item) => {
            const row = new Array(vocabSize).fill(null);
            for (const [token, value] of item.next.logits) row[token] = value;
            return row;
        }),
    };
}

async function generate(request) {
    await sequence.clearHistory();
    const tokens = [];
    const start = process.hrtime.bigint();
    const iterator = sequence.evaluate(request.tokens, { temperature: 0, yieldEogToken: true });
    for await (const token of iterator) {
        tokens.push(token);
        if (tokens.length >= request.n) break;
    }
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return { tokens, seconds };
}

async function tokenize(request) {
    return { tokens: Array.from(model.tokenize(request.text, false)) };
}

const handlers = { init, load, logits, generate, tokenize };
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
    if (!line.trim()) continue;
    const request = JSON.parse(line);
    if (request.op === "exit") break;
    let answer;
    try {
        const handler = handlers[request.op];
        answer = handler ? await handler(request) : { error: `unknown op ${request.op}` };
    } catch (error) {
        answer = { error: String(error?.stack ?? error).split("\n").slice(0, 3).join(" | ") };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
}
if (context !== null) await context.dispose();
if (model !== null) await model.dispose();
process.exit(0);
