// sluice's chat page: streams replies from POST /api/chat, renders markdown as it arrives
// (sanitised: model output is untrusted), keeps the conversation across reloads, resumes a
// reply whose connection was lost (GET /api/chat/{id} with Last-Event-ID), and Stop cancels
// it on the server.
import { marked } from '/ui/vendor/marked/marked.esm.js';
import DOMPurify from '/ui/vendor/dompurify/purify.es.mjs';
import { EventSourceParserStream } from '/ui/vendor/eventsource-parser/stream.js';

const $ = (id) => document.getElementById(id);
const STORE = 'sluice.chat.v1';
const saved = JSON.parse(localStorage.getItem(STORE) || '{}');
const state = {
  turns: saved.turns || [],            // {role, content, meta?, error?}
  model: saved.model || '',
  template: saved.template || '',
  vars: saved.vars || {},
  prompts: {},
};
let controller = null;
// The reply streaming now: its stream id and last event id.
let current = null;
// This sluice's API key, when it asks for one (kept in this browser only).
const auth = () => {
  const key = localStorage.getItem('sluice.key');
  return key ? { authorization: `Bearer ${key}` } : {};
};
function needKey() { $('key-box').hidden = false; $('key').focus(); }

function save() {
  const { turns, model, template, vars } = state;
  localStorage.setItem(STORE, JSON.stringify({ turns, model, template, vars }));
}

// Model output is untrusted. Only what markdown produces survives: no style, form, input
// or frame, and no image that loads by itself (an image is a link the user may click, so
// nothing leaves the page unasked). Links open in a new tab and send no referrer.
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
marked.use({ renderer: {
  image({ href, text }) { return `<a href="${escapeHtml(href)}">[image: ${escapeHtml(text || href)}]</a>`; },
} });
const SANITIZE = {
  ALLOWED_TAGS: ['p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'em', 'strong', 'del', 's',
    'code', 'pre', 'blockquote', 'ul', 'ol', 'li', 'a', 'table', 'thead', 'tbody', 'tr', 'th', 'td'],
  ALLOWED_ATTR: ['href', 'title', 'start', 'align', 'class'],
};
DOMPurify.addHook('uponSanitizeAttribute', (node, data) => {
  // Classes only as marked writes them (a code block's language), never the page's own.
  if (data.attrName === 'class' && !(node.nodeName === 'CODE' && /^language-[\w+#.-]+$/.test(data.attrValue))) {
    data.keepAttr = false;
  }
});
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.nodeName === 'A') { node.setAttribute('target', '_blank'); node.setAttribute('rel', 'noopener noreferrer'); }
});

// Markdown → HTML with nothing executable left; code blocks get a copy button.
function render(body, markdown) {
  body.innerHTML = DOMPurify.sanitize(marked.parse(markdown), SANITIZE);
  for (const pre of body.querySelectorAll('pre')) {
    const copy = document.createElement('button');
    copy.type = 'button'; copy.className = 'copy'; copy.textContent = 'Copy';
    copy.onclick = async () => {
      await navigator.clipboard.writeText(pre.querySelector('code')?.textContent ?? pre.textContent);
      copy.textContent = 'Copied';
      setTimeout(() => { copy.textContent = 'Copy'; }, 1200);
    };
    pre.append(copy);
  }
}

function addTurn(turn) {
  $('empty').hidden = true;
  const el = document.createElement('article');
  el.className = `turn ${turn.role}`;
  const body = document.createElement('div');
  body.className = 'body';
  el.append(body);
  if (turn.role === 'user') body.textContent = turn.content;
  else render(body, turn.content);
  if (turn.meta) note(el, 'meta', turn.meta);
  if (turn.error) note(el, 'error', turn.error);
  $('conversation').append(el);
  el.scrollIntoView({ block: 'end' });
  return el;
}

function note(el, cls, text) {
  const p = document.createElement('p');
  p.className = cls; p.textContent = text; el.append(p);
}

function showAll() {
  for (const el of document.querySelectorAll('.turn')) el.remove();
  $('empty').hidden = state.turns.length > 0;
  state.turns.forEach(addTurn);
}

function busy(on) {
  $('prompt').disabled = on; $('send').disabled = on; $('stop').disabled = !on;
  $('model').disabled = on; $('template').disabled = on; $('new-chat').disabled = on;
  if (!on) $('prompt').focus();
}

// What went wrong, in words a person can act on.
async function failure(response) {
  let message = `HTTP ${response.status}`;
  try { message = (await response.json()).error.message; } catch { /* not JSON */ }
  if (response.status === 429) {
    const wait = response.headers.get('retry-after');
    return `Rate limited: try again in ${wait || 'a few'} s. (${message})`;
  }
  if (response.status === 401) { needKey(); return `This sluice needs an API key: enter it above. (${message})`; }
  if (response.status >= 500) return `The model is unavailable: ${message}`;
  return message;
}

// How long the page keeps trying to reconnect a reply whose connection was lost.
const RECONNECT_FOR_MS = 30000;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function send(prompt) {
  const history = state.turns.filter((t) => !t.error).map(({ role, content }) => ({ role, content }));
  const user = { role: 'user', content: prompt };
  state.turns.push(user); addTurn(user);
  const reply = { role: 'assistant', content: '' };
  const el = addTurn(reply);
  const body = el.querySelector('.body');
  el.classList.add('streaming');
  busy(true);
  controller = new AbortController();
  const started = performance.now();
  let first = null, frame = 0;
  // The stream's id and the last event read: what a reconnect resumes from.
  const stream = { id: null, last: '0' };
  current = stream;
  const request = { prompt, model: state.model || undefined, history };
  if (state.template) { request.template = state.template; request.vars = state.vars[state.template] || {}; }

  // Reads one connection's events into the reply; true once the stream has ended.
  const consume = async (response) => {
    const events = response.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
    for await (const { id, event, data } of events) {
      if (id) stream.last = id;
      const payload = JSON.parse(data);
      if (event === 'meta') {
        stream.id ??= payload.id;
      } else if (event === 'token') {
        first ??= performance.now();
        reply.content += payload.text;
        // Re-render at most once a frame, however fast tokens come.
        frame ||= requestAnimationFrame(() => { frame = 0; render(body, reply.content); });
      } else if (event === 'done') {
        const tokens = payload.usage?.completion_tokens ?? 0;
        const ttft = first ? Math.round(first - started) : null;
        const seconds = first ? (performance.now() - first) / 1000 : 0;
        const rate = seconds > 0 && tokens > 1 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tokens/s` : '';
        reply.meta = `${payload.usage ? tokens + ' tokens' : ''}${ttft !== null ? ` · first token after ${ttft} ms` : ''}${rate}`;
        return true;
      } else if (event === 'error') {
        reply.error = payload.error.code === 'stream_cancelled' ? null : `The stream failed: ${payload.error.message}`;
        if (!reply.error) reply.meta = 'Stopped.';
        return true;
      }
    }
    return false;
  };

  // A lost connection: reconnect from the last event read, for as long as the stream is kept.
  const reconnect = async () => {
    const status = document.createElement('p');
    status.className = 'reconnecting'; status.setAttribute('role', 'status');
    status.textContent = 'Connection lost: reconnecting…';
    el.append(status);
    const giveUp = performance.now() + RECONNECT_FOR_MS;
    try {
      for (let wait = 250; performance.now() < giveUp; wait = Math.min(wait * 2, 2000)) {
        controller.signal.throwIfAborted();
        let response;
        try {
          response = await fetch(`/api/chat/${encodeURIComponent(stream.id)}`, {
            signal: controller.signal, headers: { 'last-event-id': stream.last, ...auth() },
          });
        } catch (err) {
          if (err.name === 'AbortError') throw err;
          await pause(wait);
          continue;
        }
        if (response.status === 204) return true;
        if (!response.ok) throw new Error(`The reply could not be resumed: ${await failure(response)}`);
        status.textContent = 'Reconnected.';
        try {
          if (await consume(response)) return true;
        } catch (err) {
          if (err.name === 'AbortError' || !(err instanceof TypeError)) throw err;
        }
        status.textContent = 'Connection lost: reconnecting…';
        await pause(wait);
      }
      throw new Error('The connection was lost and could not be restored.');
    } finally {
      status.remove();
    }
  };

  try {
    const response = await fetch('/api/chat', {
      method: 'POST', signal: controller.signal,
      headers: { 'content-type': 'application/json', ...auth() }, body: JSON.stringify(request),
    });
    if (!response.ok) throw new Error(await failure(response));
    stream.id = response.headers.get('x-sluice-stream-id');
    const resumable = response.headers.get('x-sluice-resumable') === 'true';
    let ended = false;
    try {
      ended = await consume(response);
    } catch (err) {
      if (err.name === 'AbortError' || !(err instanceof TypeError) || !resumable) throw err;
    }
    if (!ended && resumable && stream.id) ended = await reconnect();
    if (!ended) reply.error = 'The connection ended before the reply was complete.';
  } catch (err) {
    if (err.name === 'AbortError') reply.meta = 'Stopped.';
    else if (err instanceof TypeError) reply.error = `Network lost: ${err.message}`;
    else reply.error = err.message;
  } finally {
    cancelAnimationFrame(frame);
    controller = null; current = null;
    render(body, reply.content);
    el.classList.remove('streaming');
    if (reply.meta) note(el, 'meta', reply.meta);
    if (reply.error) note(el, 'error', reply.error);
    state.turns.push(reply); save();
    busy(false);
  }
}

// Stop: the server cancels the stream (it would otherwise wait for a reconnect), and this
// page stops reading.
function stop() {
  if (current?.id) {
    fetch(`/api/chat/${encodeURIComponent(current.id)}/cancel`, { method: 'POST', headers: auth(), keepalive: true })
      .catch(() => { /* the page stops reading either way */ });
  }
  controller?.abort();
}

function showVars() {
  const box = $('vars');
  box.replaceChildren();
  const prompt = state.prompts[state.template];
  box.hidden = !prompt || prompt.variables.length === 0;
  if (!prompt) return;
  const values = (state.vars[state.template] ||= {});
  for (const name of prompt.variables) {
    const label = document.createElement('label');
    label.textContent = name;
    const input = document.createElement('input');
    input.value = values[name] ?? '';
    input.oninput = () => { if (input.value) values[name] = input.value; else delete values[name]; save(); };
    label.append(input); box.append(label);
  }
}

async function load() {
  showAll();
  try {
    const response = await fetch('/v1/models', { headers: auth() });
    if (response.status === 401) needKey();
    const models = (await response.json()).data;
    // Grouped: sluice's own models, the upstream's, and the mock for tests; the mock's
    // failure modes only with ?debug (or localStorage sluice.debug = 1).
    const debug = new URLSearchParams(location.search).has('debug') || localStorage.getItem('sluice.debug') === '1';
    const failure = /^mock-(error-before|error-after|hang|stall)$/;
    const groups = [['Local', []], ['Upstream', []], ['Test', []]];
    for (const m of models) {
      if (failure.test(m.id) && !debug) continue;
      const group = m.id === 'mock' || m.id.startsWith('mock-') ? 2 : m.owned_by === 'sluice' ? 0 : 1;
      groups[group][1].push(m.id);
    }
    const shown = [];
    for (const [label, ids] of groups) {
      if (ids.length === 0) continue;
      const group = document.createElement('optgroup');
      group.label = label;
      for (const id of ids) { group.append(new Option(id, id)); shown.push(id); }
      $('model').append(group);
    }
    if (!shown.includes(state.model)) state.model = shown[0] || '';
    $('model').value = state.model;
  } catch { /* the chat still works on the default model */ }
  try {
    const prompts = await (await fetch('/api/prompts', { headers: auth() })).json();
    for (const p of prompts.data) {
      state.prompts[p.name] = p;
      const option = new Option(p.name, p.name); option.title = p.description;
      $('template').add(option);
    }
  } catch { /* no templates */ }
  if (!state.prompts[state.template]) state.template = '';
  $('template').value = state.template;
  showVars();
  document.body.dataset.ready = 'true';
}

$('key').onchange = () => { localStorage.setItem('sluice.key', $('key').value.trim()); location.reload(); };
$('model').onchange = () => { state.model = $('model').value; save(); };
$('template').onchange = () => { state.template = $('template').value; save(); showVars(); };
$('new-chat').onclick = () => { state.turns = []; save(); showAll(); $('prompt').focus(); };
$('stop').onclick = stop;
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); $('composer').requestSubmit(); }
});
$('composer').onsubmit = (e) => {
  e.preventDefault();
  const prompt = $('prompt').value.trim();
  if (!prompt || controller) return;
  $('prompt').value = '';
  send(prompt);
};
load();
