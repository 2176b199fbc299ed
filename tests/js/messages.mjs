// The @anthropic-ai/sdk package streaming through sluice's mock model, unchanged: the
// messages.stream helper to its final message. Prints one JSON line.
import Anthropic from '@anthropic-ai/sdk';

const client = new Anthropic({ baseURL: process.argv[2], apiKey: 'unused', maxRetries: 0 });
const stream = client.messages.stream({
  model: 'mock', max_tokens: 100, messages: [{ role: 'user', content: 'Tell me about rivers' }],
});
let text = '';
stream.on('text', (delta) => { text += delta; });
const message = await stream.finalMessage();
console.log(JSON.stringify({ text, final: message.content[0].text, stop_reason: message.stop_reason,
  output_tokens: message.usage.output_tokens }));
