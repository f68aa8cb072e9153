// Drive a wsgi-llama server with a third-party Node client; print what came back.
//
//   node client.mjs BASE_URL KIND
//
// KIND: openai-chat-stream, openai-completion-stream, openai-chat,
// openai-completion (the `openai` package), or eventsource-parser (fetch
// with a streaming body, frames parsed by `eventsource-parser`).
// Prints {"text": ..., "finish_reason": ...} as JSON; a client error exits 1.
import OpenAI from "openai";
import { createParser } from "eventsource-parser";

const [baseURL, kind] = process.argv.slice(2);
const MAX_TOKENS = 12;
const messages = [{ role: "user", content: "Hi" }];

async function viaOpenAI(chat, stream) {
  const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: "unused", maxRetries: 0 });
  const params = { model: "any", max_tokens: MAX_TOKENS, stream };
  const request = chat
    ? client.chat.completions.create({ ...params, messages })
    : client.completions.create({ ...params, prompt: "Once" });
  const response = await request;
  if (!stream) {
    const choice = response.choices[0];
    return { text: chat ? choice.message.content : choice.text, finish_reason: choice.finish_reason };
  }
  let text = "";
  let finish_reason = null;
  for await (const chunk of response) {
    for (const choice of chunk.choices) {
      text += (chat ? choice.delta.content : choice.text) ?? "";
      finish_reason = choice.finish_reason ?? finish_reason;
    }
  }
  return { text, finish_reason };
}

async function viaEventsourceParser() {
  const response = await fetch(`${baseURL}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: "any", messages, max_tokens: MAX_TOKENS, stream: true }),
  });
  if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  let text = "";
  let finish_reason = null;
  let done = false;
  const parser = createParser({
    onEvent(event) {
      if (event.data === "[DONE]") {
        done = true;
        return;
      }
      const chunk = JSON.parse(event.data);
      for (const choice of chunk.choices) {
        text += choice.delta.content ?? "";
        finish_reason = choice.finish_reason ?? finish_reason;
      }
    },
  });
  const decoder = new TextDecoder();
  for await (const bytes of response.body) {
    parser.feed(decoder.decode(bytes, { stream: true }));
  }
  if (!done) throw new Error("the stream ended without [DONE]");
  return { text, finish_reason };
}

const kinds = {
  "openai-chat-stream": () => viaOpenAI(true, true),
  "openai-completion-stream": () => viaOpenAI(false, true),
  "openai-chat": () => viaOpenAI(true, false),
  "openai-completion": () => viaOpenAI(false, false),
  "eventsource-parser": viaEventsourceParser,
};

try {
  if (!(kind in kinds)) throw new Error(`unknown kind ${kind}`);
  process.stdout.write(JSON.stringify(await kinds[kind]()) + "\n");
} catch (error) {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
}
