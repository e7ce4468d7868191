// One unary and one streaming chat completion through the official openai Node SDK.
// Usage: node sdk_check.mjs <base_url> [model]   (or GATEWAY_BASE_URL / GATEWAY_MODEL)
// Prints one JSON line: {"unary": {...}, "stream": {...}}; exits non-zero on any failure.
import OpenAI from "openai";

const baseURL = process.argv[2] ?? process.env.GATEWAY_BASE_URL;
const model = process.argv[3] ?? process.env.GATEWAY_MODEL ?? "gpt-4o";
if (!baseURL) {
  console.error("usage: node sdk_check.mjs <base_url> [model]");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey: "sk-node-client", maxRetries: 0, timeout: 20_000 });
const messages = [{ role: "user", content: "Say hello" }];

const { data: completion, response } = await client.chat.completions
  .create({ model, messages })
  .withResponse();

const stream = await client.chat.completions.create({
  model,
  messages,
  stream: true,
  stream_options: { include_usage: true },
});
const pieces = [];
let chunks = 0;
let usage = null;
let finish = null;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    if (choice.delta?.content) pieces.push(choice.delta.content);
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}

console.log(
  JSON.stringify({
    unary: {
      id: completion.id,
      content: completion.choices[0].message.content,
      usage: completion.usage,
      request_id: response.headers.get("x-request-id"),
    },
    stream: { text: pieces.join(""), chunks, usage, finish },
  }),
);
