/* convscope report: scatter plots, paged lists, sortable tables.
   Plain ES2017, no dependencies, works from file://. ASCII only (others as \u escapes). */
(() => {
'use strict';
// Tableau 10 (matplotlib tab10); light grey for unlabelled (-1).
const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
                 '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const GREY = '#c7c7c7', HOVER_PX = 8;
const cs = window.convscope = window.convscope || {};
for (const k of ['scatters', 'pagers', 'tables', 'errors']) cs[k] = cs[k] || [];
cs.ready = false;

const el = (tag, cls, text, ...kids) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  kids.forEach(k => e.appendChild(k));
  return e;
};
const button = (text, cls, title, ...kids) => {
  const b = el('button', cls, text, ...kids);
  b.type = 'button';
  if (title) { b.title = title; b.setAttribute('aria-label', title); }
  return b;
};
const colourOf = l => l < 0 ? GREY : PALETTE[l % PALETTE.length];
const fmt = n => Number(n).toLocaleString('en-US');
const on = (t, ev, fn, opt) => t.addEventListener(ev, fn, opt);
const all = (sel, root) => Array.from((root || document).querySelectorAll(sel));

/* ---------------------------------------------------------------- scatter */
function Scatter(root) {
  const id = root.getAttribute('data-points');
  const data = (window.CONVSCOPE_DATA || {})[id];
  if (!data || !Array.isArray(data.points)) {
    root.appendChild(el('p', 'scatter-error', 'scatter data "' + id + '" is missing'));
    throw new Error('convscope: no scatter data "' + id + '" (is data/' + id + '.js included?)');
  }
  const labels = Array.isArray(data.labels) ? data.labels : [];
  const pts = data.points, n = pts.length;
  const xs = new Float64Array(n), ys = new Float64Array(n), lab = new Int32Array(n), counts = {};
  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (let i = 0; i < n; i++) {
    const p = pts[i];
    let x = +p[0], y = +p[1], l = p[2] == null ? -1 : Math.max(-1, p[2] | 0);
    if (!isFinite(x) || !isFinite(y)) x = y = NaN;
    else { minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y); }
    xs[i] = x; ys[i] = y; lab[i] = l;
    counts[l] = (counts[l] || 0) + 1;
  }
  if (!(minX <= maxX)) { minX = minY = 0; maxX = maxY = 1; }
  if (maxX === minX) { minX -= 0.5; maxX += 0.5; }
  if (maxY === minY) { minY -= 0.5; maxY += 0.5; }

  // One index list per label, drawn in label order (unlabelled first, underneath).
  const groups = Object.keys(counts).map(Number).sort((p, q) => p - q)
    .map(l => ({ label: l, colour: colourOf(l), idx: new Int32Array(counts[l]), n: 0 }));
  const byLabel = {};
  for (const g of groups) byLabel[g.label] = g;
  for (let i = 0; i < n; i++) byLabel[lab[i]].idx[byLabel[lab[i]].n++] = i;
  const nameOf = l => l < 0 ? 'unlabelled' : labels[l] != null ? String(labels[l]) : 'label ' + l;

  // Bucket grid in data space: hover queries touch a few cells only.
  const G = Math.max(8, Math.min(256, Math.ceil(Math.sqrt(n / 2))));
  const gw = (maxX - minX) / G, gh = (maxY - minY) / G;
  const cx = x => Math.min(G - 1, Math.max(0, Math.floor((x - minX) / gw)));
  const cy = y => Math.min(G - 1, Math.max(0, Math.floor((y - minY) / gh)));
  const cells = Array.from({ length: G * G }, () => []);
  for (let i = 0; i < n; i++) if (!isNaN(xs[i])) cells[cy(ys[i]) * G + cx(xs[i])].push(i);

  // DOM
  const canvas = el('canvas', 'scatter-canvas'), overlay = el('canvas', 'scatter-overlay');
  const bIn = button('+', 'zoom-in', 'zoom in'), bOut = button('\u2212', 'zoom-out', 'zoom out');
  const bReset = button('reset', 'zoom-reset', 'reset view');
  const tipImg = el('img', 'pixelated'), tipSwatch = el('span', 'swatch'), tipName = el('span');
  const tipId = el('div', 'scatter-tip-id');
  const tip = el('div', 'scatter-tip', null, tipImg,
    el('div', 'scatter-tip-text', null, el('div', 'scatter-tip-label', null, tipSwatch, tipName), tipId));
  tip.hidden = tipImg.hidden = true; tipImg.alt = '';
  const wrap = el('div', 'scatter-plot', null, canvas, overlay,
    el('div', 'scatter-controls', null, bIn, bOut, bReset), tip);
  const head = el('div', 'scatter-head', null, el('span', 'scatter-title', data.title || ''),
    el('span', 'scatter-count', fmt(n) + ' points'),
    el('span', 'scatter-hint', 'scroll to zoom \u00b7 drag to pan \u00b7 double-click to reset'));
  const legend = el('ul', 'scatter-legend'), hidden = {};
  groups.slice().sort((p, q) => (p.label < 0) - (q.label < 0) || p.label - q.label).forEach(g => {
    const sw = el('span', 'swatch');
    sw.style.background = g.colour;
    const b = button(null, 'scatter-legend-item', 'show/hide ' + nameOf(g.label),
      sw, el('span', 'scatter-legend-name', nameOf(g.label)), el('span', 'scatter-legend-n', fmt(g.n)));
    b.setAttribute('aria-pressed', 'true');
    on(b, 'click', () => {
      hidden[g.label] = !hidden[g.label];
      b.classList.toggle('off', hidden[g.label]);
      b.setAttribute('aria-pressed', String(!hidden[g.label]));
      setHover(-1); schedule();
    });
    legend.appendChild(el('li', null, null, b));
  });
  root.textContent = '';
  [head, wrap, legend].forEach(c => root.appendChild(c));

  // View: screen x = x * a + bx, screen y = by - y * a (CSS px from the canvas' top left).
  const ctx = canvas.getContext('2d'), octx = overlay.getContext('2d');
  let W = 0, H = 0, dpr = 1, a = 1, a0 = 1, bx = 0, by = 0, hover = -1, pending = false, drag = null;
  const baseSize = n > 10000 ? 3 : n > 2000 ? 4 : 5;

  function fit() {
    a = a0 = 0.9 * Math.min(W / (maxX - minX), H / (maxY - minY));
    bx = W / 2 - a * (minX + maxX) / 2;
    by = H / 2 + a * (minY + maxY) / 2;
  }
  function setSize() {
    const w = Math.floor(wrap.clientWidth), h = Math.floor(wrap.clientHeight) || Math.round(w * 2 / 3);
    const r = window.devicePixelRatio || 1;
    if (!w || !h) return false;
    if (w === W && h === H && r === dpr) return true;
    if (W) { const fx = w / W; a *= fx; a0 *= fx; bx *= fx; by *= h / H; }
    const first = !W;
    W = w; H = h; dpr = r;
    for (const c of [canvas, overlay]) {
      c.width = Math.round(W * dpr); c.height = Math.round(H * dpr);
      c.style.width = W + 'px'; c.style.height = H + 'px';
    }
    if (first) fit();
    return true;
  }
  const ptSize = () => Math.round(baseSize * Math.min(2.5, Math.max(1, Math.pow(a / a0, 0.3))));

  function draw() {
    pending = false;
    if (!setSize()) return;
    const t0 = performance.now(), s = ptSize(), h = s / 2;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    for (const g of groups) {
      if (hidden[g.label]) continue;
      ctx.fillStyle = g.colour;
      const idx = g.idx;
      for (let k = 0; k < idx.length; k++) {
        const q = idx[k], sx = Math.round(xs[q] * a + bx - h);
        if (!(sx > -s && sx < W)) continue;
        const sy = Math.round(by - ys[q] * a - h);
        if (sy > -s && sy < H) ctx.fillRect(sx, sy, s, s);
      }
    }
    api.drawTime = performance.now() - t0;
    drawOverlay();
  }
  function drawOverlay() {
    octx.setTransform(dpr, 0, 0, dpr, 0, 0);
    octx.clearRect(0, 0, W, H);
    if (hover < 0) return;
    const sx = xs[hover] * a + bx, sy = by - ys[hover] * a, r = Math.max(4, ptSize());
    octx.beginPath(); octx.arc(sx, sy, r + 2, 0, 2 * Math.PI);
    octx.fillStyle = '#fff'; octx.fill();
    octx.beginPath(); octx.arc(sx, sy, r, 0, 2 * Math.PI);
    octx.fillStyle = colourOf(lab[hover]); octx.fill();
    octx.lineWidth = 2; octx.strokeStyle = '#111'; octx.stroke();
  }
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }
  // fn(q, squared screen distance) for each shown point within rpx screen px of (mx, my).
  function scan(mx, my, rpx, fn) {
    if (!W) return;
    const dx = (mx - bx) / a, dy = (by - my) / a, r = rpx / a, r2 = rpx * rpx;
    if (dx + r < minX || dx - r > maxX || dy + r < minY || dy - r > maxY) return;
    for (let gy = cy(dy - r); gy <= cy(dy + r); gy++) {
      for (let gx = cx(dx - r); gx <= cx(dx + r); gx++) {
        for (const q of cells[gy * G + gx]) {
          if (hidden[lab[q]]) continue;
          const ex = xs[q] * a + bx - mx, ey = by - ys[q] * a - my, d = ex * ex + ey * ey;
          if (d <= r2) fn(q, d);
        }
      }
    }
  }
  function nearest(mx, my) {
    let best = -1, bestD = Infinity;
    scan(mx, my, HOVER_PX, (q, d) => { if (d <= bestD) { bestD = d; best = q; } });
    return best;
  }
  function setHover(q, mx, my) {
    if (q !== hover) {
      hover = api.hovered = q;
      if (q >= 0) {
        const p = pts[q], thumb = p[4];
        tipName.textContent = nameOf(lab[q]);
        tipSwatch.style.background = colourOf(lab[q]);
        tipId.textContent = p[3] == null ? '#' + q : String(p[3]);
        if (thumb && tipImg.getAttribute('src') !== thumb) tipImg.src = thumb;
        tipImg.hidden = !thumb;
      }
      drawOverlay();
    }
    tip.hidden = q < 0;
    if (q < 0) return;
    const tw = tip.offsetWidth, th = tip.offsetHeight;
    let left = mx + 14, top = my + 14;
    if (left + tw > W) left = Math.max(0, mx - 14 - tw);
    if (top + th > H) top = Math.max(0, my - 14 - th);
    tip.style.left = left + 'px'; tip.style.top = top + 'px';
  }
  const local = e => {
    const r = canvas.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  };
  const hoverAt = pos => setHover(nearest(pos.x, pos.y), pos.x, pos.y);
  function zoomAt(f, mx, my) {
    f = Math.min(5000, Math.max(0.25, a * f / a0)) * a0 / a;
    a *= f; bx = mx - (mx - bx) * f; by = my - (my - by) * f;
    schedule();
  }
  function reset() { fit(); setHover(-1); schedule(); }
  const onControls = e => e.target.closest && e.target.closest('.scatter-controls');

  on(wrap, 'pointerdown', e => {
    if (e.button !== 0 || onControls(e)) return;
    drag = { x: e.clientX, y: e.clientY, bx, by };
    try { wrap.setPointerCapture(e.pointerId); } catch (err) { /* synthetic event */ }
  });
  on(wrap, 'pointermove', e => {
    if (drag) {
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (!drag.moved && dx * dx + dy * dy < 9) return;
      drag.moved = true;
      wrap.classList.add('dragging');
      bx = drag.bx + dx; by = drag.by + dy;
      setHover(-1); schedule();
    } else if (onControls(e)) setHover(-1);
    else hoverAt(local(e));
  });
  const endDrag = () => { drag = null; wrap.classList.remove('dragging'); };
  on(wrap, 'pointerup', endDrag);
  on(wrap, 'pointercancel', endDrag);
  on(wrap, 'pointerleave', () => { if (!drag) setHover(-1); });
  on(wrap, 'dblclick', e => { if (!onControls(e)) { e.preventDefault(); reset(); } });
  on(wrap, 'wheel', e => {
    e.preventDefault();
    const d = e.deltaY * (e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? H : 1), pos = local(e);
    zoomAt(Math.exp(-Math.max(-300, Math.min(300, d)) * 0.002), pos.x, pos.y);
    hoverAt(pos);
  }, { passive: false });
  on(bIn, 'click', () => { setHover(-1); zoomAt(1.5, W / 2, H / 2); });
  on(bOut, 'click', () => { setHover(-1); zoomAt(1 / 1.5, W / 2, H / 2); });
  on(bReset, 'click', reset);
  new ResizeObserver(schedule).observe(wrap);

  const api = {
    id, root, canvas, count: n, hovered: -1, drawTime: 0,
    screenPoint(q) {
      setSize();
      const r = canvas.getBoundingClientRect();
      return { x: r.left + xs[q] * a + bx, y: r.top + by - ys[q] * a };
    },
    pointInfo: q => ({ label: lab[q], name: nameOf(lab[q]), id: pts[q][3] == null ? null : String(pts[q][3]),
                       thumb: pts[q][4] || null }),
    // A shown point with no other within px screen px at the current view, or -1.
    isolatedPoint(px) {
      px = px || 2 * HOVER_PX;
      for (let q = 0; q < n; q++) {
        const sx = xs[q] * a + bx, sy = by - ys[q] * a;
        if (hidden[lab[q]] || !(sx >= px && sy >= px && sx <= W - px && sy <= H - px)) continue;
        let near = 0;
        scan(sx, sy, px, () => { near++; });
        if (near === 1) return q;
      }
      return -1;
    },
    zoomBy: (f, mx, my) => zoomAt(f, mx == null ? W / 2 : mx, my == null ? H / 2 : my),
    reset, redraw: draw
  };
  draw();
  return api;
}

/* ------------------------------------------------------------ paged lists */
function loadImages(node) {
  const imgs = all('img[data-src]', node);
  if (node.matches('img[data-src]')) imgs.push(node);
  imgs.forEach(img => { if (!img.getAttribute('src')) img.src = img.getAttribute('data-src'); });
}

function Pager(list) {
  const items = Array.from(list.children).filter(c => c.classList.contains('item'));
  let size = parseInt(list.getAttribute('data-page-size'), 10);
  if (!(size > 0)) size = 24;
  const pages = Math.max(1, Math.ceil(items.length / size));
  let nav = null, prev, next, status, range, input;
  if (pages > 1) {
    prev = button('\u2039 prev', 'pager-prev', 'previous page');
    next = button('next \u203a', 'pager-next', 'next page');
    status = el('span', 'pager-status');
    range = el('span', 'pager-range');
    input = el('input');
    input.type = 'number'; input.min = '1'; input.max = String(pages);
    input.setAttribute('aria-label', 'page number');
    nav = el('nav', 'pager', null, prev, status, next, el('label', 'pager-jump', 'go to ', input), range);
    nav.setAttribute('aria-label', 'pages');
    list.parentNode.insertBefore(nav, list);
    on(prev, 'click', () => show(api.page - 1));
    on(next, 'click', () => show(api.page + 1));
    on(input, 'change', () => show(parseInt(input.value, 10)));
  }
  function show(k) {
    k = Math.min(pages, Math.floor(k >= 1 ? k : 1));
    api.page = k;
    const lo = (k - 1) * size, hi = Math.min(items.length, lo + size);
    items.forEach((it, i) => {
      it.hidden = i < lo || i >= hi;
      if (!it.hidden) loadImages(it);
    });
    if (!nav) return;
    status.textContent = 'page ' + k + ' of ' + pages;
    range.textContent = 'items ' + (lo + 1) + '\u2013' + hi + ' of ' + items.length;
    input.value = String(k);
    prev.disabled = k <= 1; next.disabled = k >= pages;
  }
  const api = { el: list, nav, page: 1, pages, count: items.length, pageSize: size, show };
  show(1);
  return api;
}

/* -------------------------------------------------------- sortable tables */
function parseNum(s) {
  const t = s.replace(/[\s,%]/g, '').replace(/\u2212/g, '-');
  if (/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(t)) return parseFloat(t);
  const inf = /^([-+]?)inf(inity)?$/i.exec(t);
  return inf ? (inf[1] === '-' ? -Infinity : Infinity) : null;
}

function Sortable(table) {
  const headRow = table.tHead ? table.tHead.rows[table.tHead.rows.length - 1] : table.rows[0];
  const body = table.tBodies[0];
  if (!headRow || !body) return null;
  const state = { col: -1, dir: 'asc' };
  const ths = Array.from(headRow.cells).filter(c => c.tagName === 'TH');
  function sortBy(th) {
    const col = th.cellIndex, dir = state.col === col && state.dir === 'asc' ? 'desc' : 'asc';
    const rows = Array.from(body.rows).filter(r => r !== headRow);
    const vals = rows.map(r => {
      const c = r.cells[col];
      return c ? (c.getAttribute('data-sort') != null ? c.getAttribute('data-sort') : c.textContent).trim() : '';
    });
    const nums = vals.map(v => v === '' ? null : parseNum(v));
    const numeric = vals.some(v => v !== '') && vals.every((v, i) => v === '' || nums[i] !== null);
    const sign = dir === 'asc' ? 1 : -1;
    const keyed = rows.map((r, i) => ({ r, v: numeric ? nums[i] : vals[i], i, e: vals[i] === '' }));
    keyed.sort((p, q) => {
      if (p.e !== q.e) return p.e ? 1 : -1;  // empty cells last either way
      const c = p.e ? 0 : numeric ? (p.v < q.v ? -1 : p.v > q.v ? 1 : 0)
        : p.v.localeCompare(q.v, undefined, { numeric: true, sensitivity: 'base' });
      return c * sign || p.i - q.i;
    });
    const frag = document.createDocumentFragment();
    keyed.forEach(k => frag.appendChild(k.r));
    body.appendChild(frag);
    ths.forEach(h => { h.classList.remove('sort-asc', 'sort-desc'); h.removeAttribute('aria-sort'); });
    th.classList.add('sort-' + dir);
    th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
    state.col = col; state.dir = dir;
  }
  ths.forEach(th => {
    th.classList.add('sort-th');
    th.tabIndex = 0;
    on(th, 'click', () => sortBy(th));
    on(th, 'keydown', e => {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(th); }
    });
  });
  return { el: table, state, sortBy: i => sortBy(ths[i]) };
}

/* ------------------------------------------------------------------ init */
function each(sel, fn, out) {
  for (const node of all(sel)) {
    if (node.hasAttribute('data-cs-init')) continue;
    node.setAttribute('data-cs-init', '');
    try {
      const r = fn(node);
      if (r) out.push(r);
    } catch (err) {
      cs.errors.push(String(err && err.message || err));
      console.error(err);
    }
  }
}
function init() {
  each('.paged', Pager, cs.pagers);
  // Deferred images outside paged lists (the generator normally uses loading=lazy there).
  all('img[data-src]:not([src])').forEach(img => { if (!img.closest('.paged')) img.src = img.getAttribute('data-src'); });
  each('table.sortable', Sortable, cs.tables);
  each('.scatter[data-points]', Scatter, cs.scatters);
  cs.ready = true;
}
cs.init = init;
if (document.readyState === 'loading') on(document, 'DOMContentLoaded', init);
else init();
})();
