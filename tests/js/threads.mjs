// The Anthropic TypeScript SDK's message threads and tool runner, on their defaults,
// against text-tool at $TEXT_TOOL_URL. Prints one JSON line of what it saw, for
// tests/test_js_sdk.py to check; every request body it sent is in `sent`.
import Anthropic from '@anthropic-ai/sdk';
import { betaTool } from '@anthropic-ai/sdk/helpers/beta/json-schema';

const sent = [];
const recording = async (url, init) => {
  if (String(url).includes('/v1/messages') && init?.body) sent.push(JSON.parse(init.body));
  return fetch(url, init);
};
const client = new Anthropic({
  baseURL: process.env.TEXT_TOOL_URL,
  apiKey: process.env.TEXT_TOOL_KEY,
  maxRetries: 0,
  fetch: recording,
});
const model = process.env.TEXT_TOOL_MODEL;
const prompt = process.env.TEXT_TOOL_PROMPT;

const called = [];
const weather = betaTool({
  name: 'get_weather',
  description: 'The weather for a place',
  inputSchema: { type: 'object', properties: { location: { type: 'string' } }, required: ['location'] },
  run: async ({ location }) => { called.push(location); return '18C and sunny'; },
});
const replies = [];
const runner = client.beta.messages.toolRunner({
  model, max_tokens: 200, max_iterations: 4, tools: [weather],
  messages: [{ role: 'user', content: prompt }],
});
for await (const message of runner) replies.push({ id: message.id, stop_reason: message.stop_reason });
const runnerSent = sent.splice(0);

const thread = client.beta.messages.thread({ model, max_tokens: 100, system: 'Be brief.' });
const first = await thread.send({ role: 'user', content: 'My name is Ada' });
const second = await thread.send({ role: 'user', content: 'Goodbye now' });
const text = (m) => m.content.filter((b) => b.type === 'text').map((b) => b.text).join('');

let lost = null;
try {
  await client.beta.messages.create({
    model, max_tokens: 10, messages: [{ role: 'user', content: 'hi' }],
    thread: { type: 'continue', previous_message_id: 'msg_' + '0'.repeat(24) },
    betas: ['message-threads-2026-08-12'],
  });
} catch (error) {
  lost = { status: error.status, error_code: error.error_code ?? error.errorCode ?? null,
           details: error.error?.error?.details ?? null };
}
console.log(JSON.stringify({
  called, replies, runnerSent, threadSent: sent.slice(0, 2),
  first: { id: first.id, text: text(first), input: first.usage.input_tokens },
  second: { id: second.id, text: text(second), input: second.usage.input_tokens },
  lost,
}));
