// The Vercel AI SDK's default OpenAI provider (the Responses API) against the proxy.
// Usage: node responses.mjs BASE_URL  (e.g. http://127.0.0.1:8000/v1). Prints one JSON object.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const provider = createOpenAI({ baseURL: process.argv[2], apiKey: "unused" });
const model = provider("default"); // the default provider model: POST /responses
const out = {};

const plain = await generateText({ model, prompt: "Say hi.", maxRetries: 0 });
out.generate = { text: plain.text, finishReason: plain.finishReason, usage: plain.usage };

const streamed = streamText({ model, prompt: "Say hi.", maxRetries: 0 });
const parts = [];
for await (const delta of streamed.textStream) parts.push(delta);
out.stream = { parts, finishReason: await streamed.finishReason, usage: await streamed.usage };

const calls = [];
const withTool = await generateText({
  model,
  prompt: "Weather in Paris?",
  maxRetries: 0,
  tools: {
    get_weather: tool({
      description: "Weather for a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        calls.push(city);
        return `sunny in ${city}`;
      },
    }),
  },
  stopWhen: stepCountIs(3),
});
out.tool = {
  text: withTool.text,
  calls,
  steps: withTool.steps.map((s) => ({ finishReason: s.finishReason, toolCalls: s.toolCalls.length })),
};

const streamedTool = streamText({
  model,
  prompt: "Weather in Paris?",
  maxRetries: 0,
  tools: {
    get_weather: tool({
      description: "Weather for a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => `sunny in ${city}`,
    }),
  },
  stopWhen: stepCountIs(3),
});
const errors = [];
for await (const part of streamedTool.fullStream) if (part.type === "error") errors.push(String(part.error));
out.streamTool = { text: await streamedTool.text, errors };

console.log(JSON.stringify(out));
