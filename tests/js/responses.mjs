// The openai npm package and the Vercel AI SDK (its default OpenAI provider, which speaks
// the Responses API) streaming through sluice's mock model, unchanged. Prints one JSON line.
import OpenAI from 'openai';
import { streamText } from 'ai';
import { createOpenAI } from '@ai-sdk/openai';

const baseURL = process.argv[2];
const found = {};

const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0 });
const stream = await client.responses.create({ model: 'mock', input: 'Tell me about rivers', stream: true });
const types = [];
let text = '';
let final = null;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === 'response.output_text.delta') text += event.delta;
  if (event.type === 'response.completed') final = event.response;
}
found.openai = { first: types[0], last: types.at(-1), text, final: final?.output_text ?? final?.output?.[0]?.content?.[0]?.text };

const chat = await client.chat.completions.create({
  model: 'mock', stream: true, messages: [{ role: 'user', content: 'Tell me about rivers' }],
});
let chatText = '';
for await (const chunk of chat) chatText += chunk.choices[0]?.delta?.content ?? '';
found.chat = chatText;

const provider = createOpenAI({ baseURL, apiKey: 'unused' });
const result = streamText({ model: provider('mock'), prompt: 'Tell me about rivers' });
let aiText = '';
for await (const part of result.textStream) aiText += part;
found.ai = { text: aiText, finishReason: await result.finishReason, usage: (await result.usage).outputTokens };

console.log(JSON.stringify(found));
