// The admin page: keys and teams (make, edit limits and budgets, disable, rotate, revoke),
// what each spent this period against its budget, the streams each key has open, and spend
// per day over 30 days. Everything comes from the admin API with the admin key, which is
// kept in this tab's session storage only. No build step, no library: the DOM, fetch, SVG.

const STORE = 'sluice-admin-key';
const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
const COLOURS = ['#2f6feb', '#e36209', '#2da44e', '#a626a4', '#d4a72c', '#0598bc', '#cf222e', '#8250df'];

let teams = [];
let editing = null; // {kind: 'keys' | 'teams', id}

function say(text) {
  $('announce').textContent = text;
}

function fail(error) {
  const box = $('error');
  box.textContent = error.message || String(error);
  box.hidden = false;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(STORE) || ''}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    signOut('The admin key was refused. Sign in again.');
    throw new Error('The admin key was refused.');
  }
  if (!response.ok) throw new Error(data?.error?.message || `HTTP ${response.status}`);
  return data;
}

// ---- Signing in and out ------------------------------------------------------------------

function signedIn(yes) {
  $('sign-in').hidden = yes;
  $('console').hidden = !yes;
  $('refresh').hidden = !yes;
  $('sign-out').hidden = !yes;
}

function signOut(why) {
  sessionStorage.removeItem(STORE);
  signedIn(false);
  if (why) fail(new Error(why));
  $('admin-key').focus();
}

$('sign-in').addEventListener('submit', async (event) => {
  event.preventDefault();
  sessionStorage.setItem(STORE, $('admin-key').value.trim());
  $('admin-key').value = '';
  $('error').hidden = true;
  document.body.dataset.ready = 'false';
  signedIn(true);
  await load();
});
$('sign-out').addEventListener('click', () => signOut());
$('refresh').addEventListener('click', () => {
  document.body.dataset.ready = 'false';
  load();
});

// ---- Figures as people read them ---------------------------------------------------------

function usd(n) {
  if (n === null || n === undefined) return '';
  return n >= 1 || n === 0 ? `$${n.toFixed(2)}` : `$${n.toPrecision(3)}`;
}

function count(n) {
  return Number(n).toLocaleString('en');
}

function when(time) {
  return time ? new Date(time).toLocaleString() : 'never';
}

function limits(item) {
  const parts = [];
  if (item.rpm) parts.push(`${count(item.rpm)} req/min`);
  if (item.tpm) parts.push(`${count(item.tpm)} tok/min`);
  if (item.max_streams) parts.push(`${count(item.max_streams)} streams`);
  if (item.models) parts.push(`models: ${item.models.join(', ')}`);
  return parts.length ? parts.join(' · ') : 'defaults';
}

// What it spent this period, against its budget when it has one: a meter per budget.
function spend(item) {
  const s = item.spend;
  const cell = el('td', { class: 'spend' });
  if (!s) return cell;
  const budgets = [
    ['usd', item.budget_usd, s.usd, usd],
    ['tokens', item.budget_tokens, s.tokens, (n) => `${count(n)} tokens`],
  ];
  let any = false;
  for (const [, budget, spent, shown] of budgets) {
    if (budget === null || budget === undefined) continue;
    any = true;
    const label = `${shown(spent)} of ${shown(budget)} this ${s.period}`;
    cell.append(el('div', {}, label));
    cell.append(el('meter', { min: 0, max: budget || 1, value: Math.min(spent, budget || 0), 'aria-label': label }));
  }
  if (!any) cell.append(el('div', {}, `${usd(s.usd)} this month`, el('span', { class: 'muted' }, ' · no budget')));
  return cell;
}

// ---- Keys and teams --------------------------------------------------------------------

function actions(kind, item) {
  const buttons = el('div', { class: 'actions' });
  const cell = el('td', {}, buttons);
  if (item.read_only || item.state === 'revoked') return cell;
  const name = item.name;
  buttons.append(el('button', { type: 'button', 'aria-label': `Edit ${name}`, onclick: () => edit(kind, item) }, 'Edit'));
  const disabled = item.state === 'disabled';
  buttons.append(el('button', {
    type: 'button',
    'aria-label': `${disabled ? 'Enable' : 'Disable'} ${name}`,
    onclick: () => change(kind, item.id, { disabled: !disabled }, `${name} ${disabled ? 'enabled' : 'disabled'}`),
  }, disabled ? 'Enable' : 'Disable'));
  if (kind === 'keys') {
    buttons.append(el('button', { type: 'button', 'aria-label': `Rotate ${name}`, onclick: () => rotate(item) }, 'Rotate'));
    buttons.append(el('button', { type: 'button', 'aria-label': `Revoke ${name}`, onclick: () => revoke(item) }, 'Revoke'));
  } else {
    buttons.append(el('button', { type: 'button', 'aria-label': `Delete ${name}`, onclick: () => removeTeam(item) }, 'Delete'));
  }
  return cell;
}

// A table with nothing in it says so.
function none(columns, text) {
  return el('tr', {}, el('td', { colspan: columns, class: 'muted' }, text));
}

function renderKeys(keys, open) {
  const body = $('keys').tBodies[0];
  if (!keys.length) return body.replaceChildren(none(8, 'No keys yet: make one below.'));
  const teamName = (id) => teams.find((t) => t.id === id)?.name || '';
  body.replaceChildren(...keys.map((key) => el('tr', { 'data-name': key.name },
    el('th', { scope: 'row' }, key.name, key.read_only ? el('span', { class: 'muted' }, ' (configured)') : null),
    el('td', { class: `state-${key.state}` }, key.state),
    el('td', {}, teamName(key.team_id)),
    el('td', {}, key.read_only ? 'from the configuration' : limits(key)),
    key.read_only ? el('td', { class: 'muted' }, '') : spend(key),
    el('td', { class: 'open' }, String(open.get(key.name) || 0)),
    el('td', {}, when(key.last_used_at)),
    actions('keys', key),
  )));
}

function renderTeams() {
  const body = $('teams').tBodies[0];
  const rows = teams.map((team) => el('tr', { 'data-name': team.name },
    el('th', { scope: 'row' }, team.name),
    el('td', { class: `state-${team.state}` }, team.state),
    el('td', {}, String(team.keys.length)),
    el('td', {}, limits(team)),
    spend(team),
    actions('teams', team),
  ));
  body.replaceChildren(...(rows.length ? rows : [none(6, 'No teams yet.')]));
  for (const select of document.querySelectorAll('.teams-select')) {
    const chosen = select.value;
    select.replaceChildren(el('option', { value: '' }, '(none)'),
      ...teams.map((t) => el('option', { value: t.id }, t.name)));
    select.value = chosen;
  }
}

async function load() {
  try {
    const [keys, teamList, streams] = await Promise.all([
      api('GET', '/admin/keys'), api('GET', '/admin/teams'), api('GET', '/admin/streams'),
    ]);
    teams = teamList.data;
    const open = new Map(streams.data.map((s) => [s.key, s.open]));
    renderTeams();
    renderKeys(keys.data, open);
    await chart();
    $('error').hidden = true;
    document.body.dataset.ready = 'true';
  } catch (error) {
    fail(error);
  }
}

// A form's fields as the API takes them: numbers as numbers, empty ones left out (`clear`:
// sent as null, which clears them).
function fields(form, clear) {
  const body = {};
  for (const input of form.elements) {
    if (!input.name) continue;
    const value = input.value.trim();
    if (value === '') {
      if (clear) body[input.name] = null;
      continue;
    }
    if (input.name === 'models') body.models = value.split(',').map((m) => m.trim()).filter(Boolean);
    else if (input.type === 'number') body[input.name] = Number(value);
    else body[input.name] = value;
  }
  return body;
}

function showSecret(what, secret) {
  $('secret-what').textContent = what;
  $('secret-value').textContent = secret;
  $('secret').hidden = false;
  $('secret-done').focus();
}
$('secret-done').addEventListener('click', () => {
  $('secret').hidden = true;
  $('secret-value').textContent = '';
});

$('new-key').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = fields(form, false);
  if (body.budget_usd === undefined && body.budget_tokens === undefined) delete body.budget_period;
  try {
    const made = await api('POST', '/admin/keys', body);
    form.reset();
    showSecret(`Key ${made.name} was made. Its secret:`, made.key);
    say(`Key ${made.name} created`);
    await load();
  } catch (error) {
    fail(error);
  }
});

$('new-team').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = fields(form, false);
  if (body.budget_usd === undefined && body.budget_tokens === undefined) delete body.budget_period;
  try {
    const made = await api('POST', '/admin/teams', body);
    form.reset();
    say(`Team ${made.name} created`);
    await load();
  } catch (error) {
    fail(error);
  }
});

async function change(kind, id, body, done) {
  try {
    await api('PATCH', `/admin/${kind}/${encodeURIComponent(id)}`, body);
    say(done);
    await load();
  } catch (error) {
    fail(error);
  }
}

async function rotate(key) {
  if (!confirm(`Give ${key.name} a new secret? The old one stops working now.`)) return;
  try {
    const rotated = await api('POST', `/admin/keys/${encodeURIComponent(key.id)}/rotate`, {});
    showSecret(`Key ${key.name} was rotated. Its new secret:`, rotated.key);
    await load();
  } catch (error) {
    fail(error);
  }
}

async function revoke(key) {
  if (!confirm(`Revoke ${key.name}? Its next request is refused, everywhere; this cannot be undone.`)) return;
  try {
    await api('DELETE', `/admin/keys/${encodeURIComponent(key.id)}`);
    say(`${key.name} revoked`);
    await load();
  } catch (error) {
    fail(error);
  }
}

async function removeTeam(team) {
  if (!confirm(`Delete team ${team.name}?`)) return;
  try {
    await api('DELETE', `/admin/teams/${encodeURIComponent(team.id)}`);
    say(`Team ${team.name} deleted`);
    await load();
  } catch (error) {
    fail(error);
  }
}

function edit(kind, item) {
  editing = { kind, id: item.id, name: item.name };
  const form = $('edit-form');
  $('edit-title').textContent = `Edit ${item.name}`;
  for (const input of form.elements) {
    if (!input.name) continue;
    const value = item[input.name];
    input.value = value === null || value === undefined ? '' : value;
  }
  if (!item.budget_period) form.elements.budget_period.value = 'month';
  form.querySelector('.key-only').hidden = kind !== 'keys';
  $('edit').showModal();
}

$('edit').addEventListener('close', async () => {
  if ($('edit').returnValue !== 'save' || !editing) return;
  const form = $('edit-form');
  const body = fields(form, true);
  if (editing.kind !== 'keys') delete body.team_id;
  if (body.budget_usd === null && body.budget_tokens === null) delete body.budget_period;
  const { kind, id, name } = editing;
  editing = null;
  await change(kind, id, body, `${name} saved`);
});

// ---- Spend per day -----------------------------------------------------------------------

function days(n) {
  const out = [];
  const today = new Date();
  for (let i = n - 1; i >= 0; i -= 1) {
    const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
    out.push(day.toISOString().slice(0, 10));
  }
  return out;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function chart() {
  const by = document.querySelector('input[name=by]:checked').value;
  const span = days(30);
  const usage = await api('GET', `/admin/usage?group_by=day,${by}&from=${span[0]}`);
  const totals = new Map();
  const series = new Map();
  for (const row of usage.data) {
    const name = row[by] ?? '(none)';
    if (!series.has(name)) series.set(name, new Map());
    series.get(name).set(row.day, row.cost_usd);
    totals.set(name, (totals.get(name) || 0) + row.cost_usd);
  }
  // The biggest spenders get a colour each; the rest are one grey "others".
  const ranked = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
  const named = ranked.slice(0, COLOURS.length);
  const others = ranked.slice(COLOURS.length);
  const stacks = named.map((name, i) => ({ name, colour: COLOURS[i], days: series.get(name) }));
  if (others.length) {
    const merged = new Map();
    for (const name of others) for (const [day, v] of series.get(name)) merged.set(day, (merged.get(day) || 0) + v);
    stacks.push({ name: `${others.length} others`, colour: '#8a929a', days: merged });
  }
  const dayTotal = span.map((day) => stacks.reduce((sum, s) => sum + (s.days.get(day) || 0), 0));
  const top = Math.max(...dayTotal, 0);

  const [W, H, left, bottom] = [720, 220, 48, 22];
  const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img',
    'aria-label': top ? `Spend per day ${by === 'key' ? 'by key' : 'by model'}, ${span[0]} to ${span[29]}: ${usd(dayTotal.reduce((a, b) => a + b, 0))} in all` : 'No spend in the last 30 days' });
  const scale = top ? (H - bottom - 10) / top : 0;
  for (const f of [0, 0.5, 1]) {
    const y = H - bottom - f * (H - bottom - 10);
    plot.append(svg('line', { x1: left, x2: W, y1: y, y2: y, class: 'grid' }));
    plot.append(svg('text', { x: left - 4, y: y + 3, 'text-anchor': 'end', class: 'axis' }, usd(top * f)));
  }
  const step = (W - left) / span.length;
  span.forEach((day, i) => {
    let y = H - bottom;
    for (const s of stacks) {
      const v = s.days.get(day) || 0;
      if (!v) continue;
      const h = Math.max(v * scale, 1);
      y -= h;
      const bar = svg('rect', { x: left + i * step + 1, y, width: Math.max(step - 2, 1), height: h, fill: s.colour });
      bar.append(svg('title', {}, `${day} · ${s.name}: ${usd(v)}`));
      plot.append(bar);
    }
    if (i % 5 === 0 || i === span.length - 1) {
      plot.append(svg('text', { x: left + i * step + step / 2, y: H - 6, 'text-anchor': 'middle', class: 'axis' }, day.slice(5)));
    }
  });
  $('chart').replaceChildren(plot);
  $('legend').replaceChildren(...stacks.map((s) => {
    const swatch = svg('svg', { viewBox: '0 0 10 10' });
    swatch.append(svg('rect', { width: 10, height: 10, fill: s.colour }));
    return el('li', {}, swatch, `${s.name} (${usd(totals.get(s.name) ?? [...s.days.values()].reduce((a, b) => a + b, 0))})`);
  }));
  // The same figures as a table, for screen readers and for reading exact values.
  const table = $('chart-table');
  table.tHead.replaceChildren(el('tr', {}, el('th', { scope: 'col' }, 'Day'),
    ...stacks.map((s) => el('th', { scope: 'col' }, s.name)), el('th', { scope: 'col' }, 'Total')));
  table.tBodies[0].replaceChildren(...span.map((day, i) => el('tr', {},
    el('th', { scope: 'row' }, day),
    ...stacks.map((s) => el('td', {}, usd(s.days.get(day) || 0))),
    el('td', {}, usd(dayTotal[i])))));
}

for (const radio of document.querySelectorAll('input[name=by]')) {
  radio.addEventListener('change', () => chart().catch(fail));
}

// ---- Start -----------------------------------------------------------------------------

if (sessionStorage.getItem(STORE)) {
  signedIn(true);
  load();
} else {
  signedIn(false);
  document.body.dataset.ready = 'true';
  $('admin-key').focus();
}
