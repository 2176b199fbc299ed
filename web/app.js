// sluice's chat page: conversations kept in this browser, replies streamed from
// POST /api/chat and rendered as markdown as they arrive (sanitised: model output is
// untrusted; finished blocks are rendered once, only the growing tail again), resumed after
// a lost connection (GET /api/chat/{id} with Last-Event-ID), stopped on the server (the
// cancel route), regenerated, edited and resent.
import { marked } from '/ui/vendor/marked/marked.esm.js';
import DOMPurify from '/ui/vendor/dompurify/purify.es.mjs';
import { EventSourceParserStream } from '/ui/vendor/eventsource-parser/stream.js';

const $ = (id) => document.getElementById(id);
const STORE = 'sluice.chats.v2';
const newId = () => Math.random().toString(36).slice(2, 10);
const blank = () => ({ id: newId(), title: '', turns: [], settings: {} });

// Conversations: {id, title, turns: [{role, content, meta?, error?, cut?}], settings: {system,
// temperature, max_tokens}}; the current one, the model, the template and its values.
const saved = JSON.parse(localStorage.getItem(STORE) || 'null');
const old = JSON.parse(localStorage.getItem('sluice.chat.v1') || 'null');
const state = saved || {
  chats: [{ ...blank(), turns: old?.turns || [] }], current: null,
  model: old?.model || '', template: old?.template || '', vars: old?.vars || {},
};
if (!state.chats.length) state.chats.push(blank());
if (!state.chats.some((c) => c.id === state.current)) state.current = state.chats[0].id;
state.prompts = {};
const chat = () => state.chats.find((c) => c.id === state.current);
const save = () => {
  const { prompts, ...kept } = state;
  localStorage.setItem(STORE, JSON.stringify(kept));
};

// The reply streaming now: its controller, stream id and last event id.
let live = null;
// This sluice's API key, when it asks for one (kept in this browser only).
const auth = () => {
  const key = localStorage.getItem('sluice.key');
  return key ? { authorization: `Bearer ${key}` } : {};
};
function needKey() { $('key-box').hidden = false; $('key').focus(); }

// --- Markdown ------------------------------------------------------------------------
// Model output is untrusted. Only what markdown produces survives: no style, form, input
// or frame, and no image that loads by itself (an image is a link the user may click, so
// nothing leaves the page unasked). Links open in a new tab and send no referrer.
// Icons drawn inline (no emoji font needed): SVG path data on a 24-unit grid.
const PENCIL = 'M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4';
const TRASH = 'M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13M10 11v6M14 11v6';
const CROSS = 'M6 6l12 12M18 6L6 18';
const SLIDERS = 'M4 6h16M4 12h16M4 18h16M9 4v4M15 10v4M7 16v4';
function icon(path) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24'); svg.setAttribute('width', '16'); svg.setAttribute('height', '16');
  svg.setAttribute('aria-hidden', 'true'); svg.setAttribute('focusable', 'false');
  const line = document.createElementNS(ns, 'path');
  line.setAttribute('d', path); line.setAttribute('fill', 'none'); line.setAttribute('stroke', 'currentColor');
  line.setAttribute('stroke-width', '2'); line.setAttribute('stroke-linecap', 'round'); line.setAttribute('stroke-linejoin', 'round');
  svg.append(line);
  return svg;
}

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

// A table written on one line ("| a | b | |---|---| | 1 | 2 |", as small models and
// scripted replies write it) gets its lines back; any other line is left as it is.
const DELIMITER = /^\s*:?-{3,}:?\s*$/;
function unfoldTable(line) {
  const t = line.trim();
  if (!t.startsWith('|') || !t.endsWith('|') || !/\|\s*\|\s*:?-{3,}/.test(t)) return line;
  const cells = t.slice(1, -1).split('|');
  const width = cells.findIndex((c) => DELIMITER.test(c)) - 1;
  if (width < 1 || cells[width].trim() !== '') return line;
  const rows = [];
  for (let i = 0; i < cells.length; i += width + 1) {
    const row = cells.slice(i, i + width);
    if (row.length !== width || (i + width < cells.length && cells[i + width].trim() !== '')) return line;
    rows.push(row);
  }
  if (rows.length < 2 || !rows[1].every((c) => DELIMITER.test(c))) return line;
  return rows.map((row) => `|${row.join('|')}|`).join('\n');
}
function unfoldTables(markdown) {
  if (!markdown.includes('|')) return markdown;
  let fenced = false;
  return markdown.split('\n').map((line) => {
    if (/^\s*(```|~~~)/.test(line)) fenced = !fenced;
    return fenced ? line : unfoldTable(line);
  }).join('\n');
}

// Markdown → sanitised nodes: tables in a scrolling frame, code highlighted (Prism, with a
// language) and given a copy button. Math is left as the text it is.
function fragment(markdown) {
  const box = document.createElement('div');
  box.innerHTML = DOMPurify.sanitize(marked.parse(unfoldTables(markdown)), SANITIZE);
  for (const table of box.querySelectorAll('table')) {
    const frame = document.createElement('div');
    frame.className = 'table'; table.replaceWith(frame); frame.append(table);
  }
  for (const code of box.querySelectorAll('pre > code')) {
    if (/language-/.test(code.className) && globalThis.Prism) {
      try { globalThis.Prism.highlightElement(code); } catch { /* left plain */ }
    }
    const copy = document.createElement('button');
    copy.type = 'button'; copy.className = 'copy'; copy.textContent = 'Copy';
    copy.setAttribute('aria-label', 'Copy this code');
    copy.onclick = () => copyText(code.textContent, copy);
    code.parentElement.append(copy);
  }
  return box.childNodes;
}

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); button.textContent = 'Copied'; } catch { button.textContent = 'Copy failed'; }
  setTimeout(() => { button.textContent = button.dataset.label || 'Copy'; }, 1200);
}

// Where a reply's text can be cut without changing how either side renders: the last
// blank line outside a code fence.
function settledEnd(text) {
  let end = 0, fenced = false, at = 0;
  for (const line of text.split('\n')) {
    const next = at + line.length + 1;
    if (/^\s*(```|~~~)/.test(line)) fenced = !fenced;
    else if (!fenced && line.trim() === '' && next <= text.length) end = next;
    at = next;
  }
  return end;
}

// A reply being written: finished blocks rendered once, the rest again at most once a frame.
class Growing {
  constructor(body) {
    this.body = body; this.settled = 0; this.text = '';
    this.done = document.createElement('div'); this.tail = document.createElement('div');
    this.done.className = 'settled'; this.tail.className = 'tail';
    body.replaceChildren(this.done, this.tail);
  }
  update(text) {
    this.text = text;
    const end = settledEnd(text);
    if (end > this.settled) {
      this.done.append(...fragment(text.slice(this.settled, end)));
      this.settled = end;
    }
    this.tail.replaceChildren(...fragment(text.slice(this.settled)));
  }
}

function render(body, markdown) { body.replaceChildren(...fragment(markdown)); }

// --- The conversation on screen -------------------------------------------------------
const view = $('conversation');
// Whether the view follows the reply: yes until the user scrolls up.
let stick = true;
const atBottom = () => view.scrollHeight - view.scrollTop - view.clientHeight < 40;
const toBottom = () => { view.scrollTop = view.scrollHeight; };
view.addEventListener('scroll', () => {
  stick = atBottom();
  $('jump').hidden = stick || !live;
});
$('jump').onclick = () => { stick = true; toBottom(); $('jump').hidden = true; $('prompt').focus(); };
const follow = () => { if (stick) toBottom(); else if (live) $('jump').hidden = false; };

// What a reply the token limit ended says (it would otherwise look finished).
const CUT = 'Stopped at the token limit.';

function note(el, cls, text) {
  const p = document.createElement('p');
  p.className = cls; p.textContent = text; el.append(p);
  return p;
}

function actions(el, turn, index) {
  const bar = document.createElement('div');
  bar.className = 'actions';
  const button = (label, title, onclick) => {
    const b = document.createElement('button');
    b.type = 'button'; b.textContent = label; b.dataset.label = label; b.title = title;
    b.setAttribute('aria-label', title); b.onclick = onclick; bar.append(b);
    return b;
  };
  if (turn.role === 'user') {
    button('Edit', 'Edit this message and send it again', () => edit(el, index));
  } else {
    const copy = button('Copy', 'Copy this reply as markdown', () => copyText(turn.content, copy));
    copy.classList.add('copy-reply');
    const last = index === chat().turns.length - 1;
    if (last) button('Regenerate', 'Regenerate this reply', regenerate).classList.add('regenerate');
    // Cut by the token limit: ask for the rest.
    if (last && turn.cut) button('Continue', 'Ask for the rest of this reply', () => { if (!live) send('Continue.'); }).classList.add('continue');
  }
  el.append(bar);
}

function addTurn(turn, index) {
  $('empty').hidden = true;
  const el = document.createElement('article');
  el.className = `turn ${turn.role}`;
  el.setAttribute('aria-label', turn.role === 'user' ? 'You said' : 'Reply');
  const body = document.createElement('div');
  body.className = 'body';
  el.append(body);
  if (turn.role === 'user') body.textContent = turn.content;
  else render(body, turn.content);
  if (turn.cut) note(el, 'cut', CUT);
  if (turn.meta) note(el, 'meta', turn.meta);
  if (turn.error) note(el, 'error', turn.error);
  if (index !== undefined) actions(el, turn, index);
  view.append(el);
  return el;
}

function showChat() {
  for (const el of view.querySelectorAll('.turn')) el.remove();
  const { turns, settings } = chat();
  $('empty').hidden = turns.length > 0;
  turns.forEach(addTurn);
  stick = true; toBottom();
  $('system').value = settings.system || '';
  $('temperature').value = settings.temperature ?? '';
  $('max-tokens').value = settings.max_tokens ?? '';
  showChats();
}

function showChats() {
  const list = $('chats');
  list.replaceChildren();
  // A conversation is listed once something is typed in it.
  for (const c of state.chats.filter((c) => c.turns.length || c.title)) {
    const li = document.createElement('li');
    li.className = 'chat';
    const open = document.createElement('button');
    open.type = 'button'; open.className = 'open'; open.textContent = c.title || 'New chat';
    if (c.id === state.current) open.setAttribute('aria-current', 'page');
    open.onclick = () => { if (live) return; state.current = c.id; save(); showChat(); closeSidebar(); };
    const rename = document.createElement('button');
    rename.type = 'button'; rename.className = 'rename icon'; rename.append(icon(PENCIL));
    rename.setAttribute('aria-label', `Rename “${c.title || 'New chat'}”`);
    rename.onclick = () => {
      const input = document.createElement('input');
      input.value = c.title; input.setAttribute('aria-label', 'Conversation title');
      const done = (keep) => { if (keep && input.value.trim()) c.title = input.value.trim(); save(); showChats(); };
      input.onkeydown = (e) => { if (e.key === 'Enter') done(true); if (e.key === 'Escape') done(false); };
      input.onblur = () => done(true);
      open.replaceWith(input); input.focus(); input.select();
    };
    const remove = document.createElement('button');
    remove.type = 'button'; remove.className = 'delete icon'; remove.append(icon(TRASH));
    remove.setAttribute('aria-label', `Delete “${c.title || 'New chat'}”`);
    remove.onclick = () => {
      if (live && c.id === state.current) return;
      state.chats = state.chats.filter((x) => x !== c);
      if (!state.chats.length) state.chats.push(blank());
      if (c.id === state.current) { state.current = state.chats[0].id; showChat(); }
      save(); showChats();
    };
    li.append(open, rename, remove);
    list.append(li);
  }
}

// On a phone there is no Enter to send with a keyboard's Shift beside it: the placeholder
// says only what the box is for.
const narrow = matchMedia('(max-width: 560px)');
const placeholder = () => {
  $('prompt').placeholder = narrow.matches ? 'Message sluice…' : 'Message sluice… (Enter sends, Shift+Enter for a new line)';
};
narrow.addEventListener('change', placeholder);
placeholder();

function newChat() {
  if (live) return;
  const empty = state.chats.find((c) => c.turns.length === 0);
  const c = empty || blank();
  if (!empty) state.chats.unshift(c);
  state.current = c.id; save(); showChat(); $('prompt').focus();
}

function busy(on) {
  $('send').hidden = on; $('stop').hidden = !on;
  $('model').disabled = on; $('template').disabled = on;
  for (const b of view.querySelectorAll('.actions button:not(.copy-reply)')) b.disabled = on;
  if (!on) { $('jump').hidden = true; $('prompt').focus(); }
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

// --- Sending --------------------------------------------------------------------------
// How long the page keeps trying to reconnect a reply whose connection was lost.
const RECONNECT_FOR_MS = 30000;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Sends `prompt` after the conversation's turns so far; the reply streams in below it.
async function send(prompt) {
  const c = chat();
  const history = c.turns.filter((t) => !t.error).map(({ role, content }) => ({ role, content }));
  const user = { role: 'user', content: prompt };
  c.turns.push(user);
  if (!c.title) c.title = prompt.replace(/\s+/g, ' ').trim().slice(0, 40);
  save(); showChats();
  addTurn(user);
  const reply = { role: 'assistant', content: '' };
  const el = addTurn(reply);
  const body = el.querySelector('.body');
  const growing = new Growing(body);
  el.classList.add('streaming');
  stick = true; toBottom();
  const controller = new AbortController();
  const stream = { id: null, last: '0', controller };
  live = stream;
  busy(true);
  $('announce').textContent = 'Writing a reply…';
  const started = performance.now();
  let first = null, frame = 0;
  const { system, temperature, max_tokens } = c.settings;
  const request = { prompt, model: state.model || undefined, history, system: system || undefined,
    temperature: temperature ?? undefined, max_tokens: max_tokens ?? undefined };
  if (state.template) { request.template = state.template; request.vars = state.vars[state.template] || {}; }
  // Each repaint is a User Timing measure (`sluice:render`), to see its cost in DevTools.
  const paint = () => {
    frame = 0;
    const mark = performance.now();
    growing.update(reply.content);
    follow();
    performance.measure('sluice:render', { start: mark });
  };

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
        frame ||= requestAnimationFrame(paint);
      } else if (event === 'done') {
        const tokens = payload.usage?.completion_tokens ?? 0;
        const ttft = first ? Math.round(first - started) : null;
        const seconds = first ? (performance.now() - first) / 1000 : 0;
        const rate = seconds > 0 && tokens > 1 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tokens/s` : '';
        // What it cost, when its model has a price (to the millionth of a dollar, at least two places).
        const cost = payload.cost > 0 ? ` · $${Number(payload.cost.toFixed(6)).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 6 })}` : '';
        reply.meta = `${payload.usage ? tokens + ' tokens' : ''}${ttft !== null ? ` · first token after ${ttft} ms` : ''}${rate}${cost}`;
        if (payload.finish_reason === 'length') reply.cut = true;
        return true;
      } else if (event === 'error') {
        if (payload.error.code === 'stream_cancelled') reply.meta = 'Stopped.';
        else reply.error = `The stream failed: ${payload.error.message}`;
        return true;
      }
    }
    return false;
  };

  // A lost connection: reconnect from the last event read, for as long as the stream is kept.
  const reconnect = async () => {
    const status = note(el, 'reconnecting', 'Connection lost: reconnecting…');
    status.setAttribute('role', 'status');
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
    live = null;
    // The tail once more: what is settled stays as it is (no re-parse of a long reply).
    growing.update(reply.content);
    el.classList.remove('streaming');
    if (reply.cut) note(el, 'cut', CUT);
    if (reply.meta) note(el, 'meta', reply.meta);
    if (reply.error) note(el, 'error', reply.error);
    // The turns it answered may have been edited away meanwhile: only a reply to them stays.
    if (c.turns.at(-1) === user) c.turns.push(reply);
    save();
    // Once, when done: a screen reader hears the reply, not every word of it.
    $('announce').textContent = reply.error || `Reply: ${reply.content}${reply.cut ? ` (${CUT})` : ''}`;
    if (chat() === c) {
      for (const a of view.querySelectorAll('.turn .actions')) a.remove();
      view.querySelectorAll('.turn').forEach((t, i) => { if (c.turns[i]) actions(t, c.turns[i], i); });
    }
    busy(false);
    follow();
  }
}

// Stop: the server cancels the stream (it would otherwise wait for a reconnect), and this
// page stops reading.
function stop() {
  if (!live) return;
  if (live.id) {
    fetch(`/api/chat/${encodeURIComponent(live.id)}/cancel`, { method: 'POST', headers: auth(), keepalive: true })
      .catch(() => { /* the page stops reading either way */ });
  }
  live.controller.abort();
}

// The last reply, written again: it replaces the old one.
function regenerate() {
  const c = chat();
  if (live || c.turns.length < 2 || c.turns.at(-1).role !== 'assistant') return;
  c.turns.pop();
  const user = c.turns.pop();
  save(); showChat();
  send(user.content);
}

// An earlier message, edited and sent again: the turns after it are replaced.
function edit(el, index) {
  if (live) return;
  const c = chat();
  const body = el.querySelector('.body');
  const box = document.createElement('textarea');
  box.className = 'editing'; box.value = c.turns[index].content; box.setAttribute('aria-label', 'Edit your message');
  const sendAgain = document.createElement('button');
  sendAgain.type = 'button'; sendAgain.textContent = 'Save & send'; sendAgain.className = 'resend';
  const cancel = document.createElement('button');
  cancel.type = 'button'; cancel.textContent = 'Cancel';
  sendAgain.onclick = () => {
    const text = box.value.trim();
    if (!text) return;
    c.turns.splice(index);
    save(); showChat();
    send(text);
  };
  cancel.onclick = showChat;
  box.onkeydown = (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendAgain.click(); }
    if (e.key === 'Escape') { e.stopPropagation(); showChat(); }
  };
  body.replaceChildren(box);
  el.querySelector('.actions')?.replaceChildren(sendAgain, cancel);
  box.focus();
}

// --- Settings, models, templates --------------------------------------------------------
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

let models = [];
// Grouped: sluice's own models, the upstream's, and the mock for tests; the mock's failure
// modes only with ?debug or the setting.
function showModels() {
  const debug = new URLSearchParams(location.search).has('debug') || localStorage.getItem('sluice.debug') === '1';
  $('debug').checked = debug;
  const failing = /^mock-(error-before|error-after|hang|stall)$/;
  const groups = [['Local', []], ['Upstream', []], ['Test', []]];
  for (const m of models) {
    if (failing.test(m.id) && !debug) continue;
    const group = m.id === 'mock' || m.id.startsWith('mock-') ? 2 : m.owned_by === 'sluice' ? 0 : 1;
    groups[group][1].push(m.id);
  }
  const select = $('model');
  select.replaceChildren();
  const shown = [];
  for (const [label, ids] of groups) {
    if (ids.length === 0) continue;
    const group = document.createElement('optgroup');
    group.label = label;
    for (const id of ids) { group.append(new Option(id, id)); shown.push(id); }
    select.append(group);
  }
  if (!shown.includes(state.model)) state.model = shown[0] || '';
  select.value = state.model;
}

const number = (value) => (value === '' ? undefined : Number(value));
$('system').oninput = () => { chat().settings.system = $('system').value; save(); };
$('temperature').oninput = () => { chat().settings.temperature = number($('temperature').value); save(); };
$('max-tokens').oninput = () => { chat().settings.max_tokens = number($('max-tokens').value); save(); };
$('debug').onchange = () => { localStorage.setItem('sluice.debug', $('debug').checked ? '1' : '0'); showModels(); };
$('settings-toggle').onclick = () => {
  const open = $('settings').hidden;
  $('settings').hidden = !open; $('settings-toggle').setAttribute('aria-expanded', String(open));
};

// Light and dark follow the system until the toggle picks one.
const applyTheme = () => {
  const theme = localStorage.getItem('sluice.theme');
  if (theme) document.documentElement.dataset.theme = theme; else delete document.documentElement.dataset.theme;
};
$('theme').onclick = () => {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === 'dark'
    : matchMedia('(prefers-color-scheme: dark)').matches;
  localStorage.setItem('sluice.theme', dark ? 'light' : 'dark');
  applyTheme();
};
applyTheme();

function closeSidebar() { document.body.classList.remove('sidebar-open'); $('toggle-sidebar').setAttribute('aria-expanded', 'false'); }
$('close-sidebar').append(icon(CROSS));
$('close-sidebar').onclick = () => { closeSidebar(); $('toggle-sidebar').focus(); };
$('settings-toggle').prepend(icon(SLIDERS));
$('key-box').onsubmit = (e) => { e.preventDefault(); $('key').dispatchEvent(new Event('change')); };
$('toggle-sidebar').onclick = () => {
  const open = document.body.classList.toggle('sidebar-open');
  $('toggle-sidebar').setAttribute('aria-expanded', String(open));
};

async function load() {
  showChat();
  try {
    const response = await fetch('/v1/models', { headers: auth() });
    if (response.status === 401) needKey();
    models = (await response.json()).data;
    showModels();
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
$('new-chat').onclick = newChat;
$('stop').onclick = stop;
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && live) { e.preventDefault(); stop(); }
  if ((e.ctrlKey || e.metaKey) && e.shiftKey && e.key.toLowerCase() === 'o') { e.preventDefault(); newChat(); }
});
$('prompt').addEventListener('keydown', (e) => {
  // While a reply streams, Enter sends nothing (Stop is the button): the text waits.
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!live) $('composer').requestSubmit(); }
});
$('composer').onsubmit = (e) => {
  e.preventDefault();
  const prompt = $('prompt').value.trim();
  if (!prompt || live) return;
  $('prompt').value = '';
  send(prompt);
};
load();
