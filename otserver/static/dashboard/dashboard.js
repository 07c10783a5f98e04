/*! otserver's dashboard. Plain ES2020, no build step; charts by uPlot (dashboard/uPlot.*, MIT).
 * Reads the read API of the server it is served from, with a read token typed into the sign-in
 * form, kept in sessionStorage (this tab only) and sent as `Authorization: Bearer TOKEN`; a 401
 * shows the sign-in again with the server's reason.
 * The choice (site, range, bots) lives in the URL hash: #si=example.com&range=7d&bots=1
 * (range today | 24h | 7d | 30d | custom, with from=/to= as datetime-local values).
 * A load fires every report at once and fills each part as its answer comes; when all have
 * come, <body data-ready="1"> and the performance mark "dashboard-ready" (bench/dashboard_paint.py
 * measures them); "error" when one failed, "0" while loading. The live feed reads
 * /api/v1/live with fetch() streaming (EventSource cannot send Authorization) and resumes with
 * Last-Event-ID. Every value shown is set as text (textContent), never as markup.
 */
(function (w, d) {
  'use strict';
  var $ = id => d.getElementById(id);
  var body = d.body;
  var TOKEN = 'otserver.dashboard.token';
  var MINUTE = 6e4, HOUR = 36e5, DAY = 864e5;
  var BUCKETS = { minute: MINUTE, hour: HOUR, day: DAY };
  var SPANS = { '24h': DAY, '7d': 7 * DAY, '30d': 30 * DAY };
  var NOW_MS = 5 * MINUTE; // "visitors now": sessions with an event in the last 5 minutes
  var REFRESH_MS = 1e4; // visitors now and totals
  var FEED_MAX = 50;
  var TABLES = [ // [by, title, first column]
    ['url', 'Top pages', 'Page'], ['referrer_host', 'Referrers', 'Referrer'],
    ['utm_source', 'UTM sources', 'Source'], ['utm_campaign', 'UTM campaigns', 'Campaign'],
    ['browser', 'Browsers', 'Browser'], ['os', 'Operating systems', 'OS'],
    ['device', 'Devices', 'Device']];
  var number = new Intl.NumberFormat();
  var compact = new Intl.NumberFormat(undefined, { notation: 'compact' });
  var COUNTS = [1, 2, 5].flatMap(m => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map(p => m * p))
    .sort((a, b) => a - b); // whole numbers on the y axis

  var token = sessionStorage.getItem(TOKEN) || '';
  var state = { si: '', range: '24h', from: '', to: '', bots: false };
  var gen = 0; // the current load: answers to an older one are dropped
  var plot = null, plotData = null;
  var live = { ctl: null, si: '', last: null, tries: 0, timer: 0 };
  var refresher = 0, started = false;

  // ---------------------------------------------------------------- the API

  var failure = (status, message) => Object.assign(new Error(message), { status });

  var api = (path, params) => {
    var q = new URLSearchParams(params || {});
    if (params && state.bots) q.set('include_bots', 'true');
    return fetch('api/v1/' + path + (params ? '?' + q : ''), {
      headers: { Authorization: 'Bearer ' + token }, cache: 'no-store', credentials: 'omit'
    }).then(r => r.json().catch(() => ({})).then(json => {
      if (r.ok) return json;
      throw failure(r.status, json.error || r.status + ' ' + r.statusText);
    }), () => { throw failure(0, 'the server did not answer') });
  };

  // ---------------------------------------------------------------- the choice and the hash

  var local = ms => { // a datetime-local value
    var t = new Date(ms - new Date(ms).getTimezoneOffset() * MINUTE);
    return t.toISOString().slice(0, 16);
  };

  var span = () => { // [from, to] in ms
    var now = Date.now();
    if (state.range == 'today') {
      var midnight = new Date(now);
      midnight.setHours(0, 0, 0, 0);
      return [+midnight, now];
    }
    if (state.range == 'custom') {
      var from = new Date(state.from).getTime(), to = new Date(state.to).getTime();
      return [isNaN(from) ? now - DAY : from, isNaN(to) ? now : to];
    }
    return [now - SPANS[state.range], now];
  };

  var bucketFor = ms => ms <= 6 * HOUR ? 'minute' : ms <= 8 * DAY ? 'hour' : 'day';

  var readHash = () => {
    var h = new URLSearchParams(location.hash.slice(1));
    state.si = h.get('si') || '';
    state.range = h.get('range') in SPANS || /^(today|custom)$/.test(h.get('range')) ? h.get('range') : '24h';
    state.from = h.get('from') || local(Date.now() - 7 * DAY);
    state.to = h.get('to') || local(Date.now() + MINUTE);
    state.bots = h.get('bots') == '1';
  };

  var writeHash = () => {
    var h = new URLSearchParams({ si: state.si, range: state.range });
    if (state.range == 'custom') { h.set('from', state.from); h.set('to', state.to) }
    if (state.bots) h.set('bots', '1');
    history.replaceState(null, '', '#' + h);
  };

  var showChoice = () => {
    $('range').value = state.range;
    $('from').value = state.from;
    $('to').value = state.to;
    $('custom').hidden = state.range != 'custom';
    $('bots').checked = state.bots;
    if (state.si) {
      var site = $('site');
      if (![...site.options].some(o => o.value == state.si)) site.append(new Option(state.si, state.si));
      site.value = state.si;
    }
  };

  // ---------------------------------------------------------------- showing

  var setNum = (id, n) => {
    var el = $(id);
    el.dataset.value = n;
    el.textContent = number.format(n);
  };

  var problem = message => {
    $('error').hidden = !message;
    $('error').textContent = message || '';
  };

  var sections = {}; // by -> tbody
  var buildTables = () => {
    var tpl = $('table-template').content;
    TABLES.forEach(([by, title, column]) => {
      var section = tpl.firstElementChild.cloneNode(true);
      section.id = 't-' + by;
      section.dataset.by = by;
      section.querySelector('h2').textContent = title;
      section.querySelector('th.v').textContent = column;
      $('tables').append(section);
      sections[by] = section.querySelector('tbody');
    });
  };

  var cell = (text, cls) => {
    var td = d.createElement('td');
    td.className = cls;
    td.textContent = text;
    return td;
  };

  var note = (tbody, text) => {
    var tr = d.createElement('tr'), td = cell(text, 'empty');
    td.colSpan = 3;
    tr.append(td);
    tbody.replaceChildren(tr);
  };

  var showTable = (by, rows) => {
    var tbody = sections[by];
    if (!rows.length) return note(tbody, 'No data in this range');
    var most = Math.max(1, ...rows.map(r => r.events));
    tbody.replaceChildren(...rows.map(r => {
      var tr = d.createElement('tr'), value = String(r.value);
      var v = cell(value, 'v' + (/^\(\w+\)$/.test(value) ? ' special' : '')); // (other), (direct)
      v.title = value;
      v.style.setProperty('--w', (100 * r.events / most).toFixed(1) + '%');
      tr.dataset.value = value;
      tr.append(v, cell(number.format(r.visitors), 'n visitors'), cell(number.format(r.events), 'n events'));
      tr.children[1].dataset.value = r.visitors;
      tr.children[2].dataset.value = r.events;
      return tr;
    }));
  };

  var showTotals = s => {
    var t = s.totals, box = $('totals');
    setNum('total-events', t.events);
    setNum('total-sessions', t.sessions);
    setNum('total-visitors', t.visitors);
    Object.assign(box.dataset, { from: s.from, to: s.to, bucket: s.bucket, bots: !!s.include_bots });
  };

  var series = (label, stroke, more) => Object.assign({ label, stroke, width: 2, points: { show: false } }, more);

  var showChart = s => {
    var size = BUCKETS[s.bucket], byStart = new Map(s.buckets.map(b => [b.start, b]));
    var xs = [], events = [], sessions = [], visitors = [];
    for (var t = Math.floor(s.from / size) * size; t < s.to; t += size) { // no events: 0
      var b = byStart.get(t) || {};
      xs.push(t / 1e3);
      events.push(b.events || 0);
      sessions.push(b.sessions || 0);
      visitors.push(b.visitors || 0);
    }
    plotData = [xs, events, sessions, visitors];
    $('chart').dataset.bucket = s.bucket;
    $('chart').dataset.points = xs.length;
    $('chart-bucket').textContent = 'per ' + s.bucket;
    if (plot) return plot.setData(plotData);
    var box = $('chart');
    plot = new uPlot({
      width: box.clientWidth, height: 280,
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(4, hi * 1.1)] } },
      cursor: { drag: { x: false, y: false } },
      series: [{}, series('Events', '#2563eb', { fill: 'rgba(37,99,235,.08)' }),
        series('Sessions', '#16a34a'), series('Visitors', '#ea580c', { dash: [6, 3] })], // often one line
      axes: [{ stroke: '#656d76', grid: { stroke: '#eaeef2' }, ticks: { stroke: '#eaeef2' } },
        { stroke: '#656d76', grid: { stroke: '#eaeef2' }, ticks: { stroke: '#eaeef2' }, size: 56,
          incrs: COUNTS, values: (u, ticks) => ticks.map(v => compact.format(v)) }]
    }, plotData, box);
  };

  var fit = () => requestAnimationFrame(() => { // not inside the resize observer's own pass
    var box = $('chart');
    if (plot && box.clientWidth && box.clientWidth != plot.width) plot.setSize({ width: box.clientWidth, height: 280 });
  });

  // ---------------------------------------------------------------- loading

  var onFail = (g, e, where) => {
    if (g != gen) return;
    if (e.status == 401) return signOut(e.message);
    problem(where + ': ' + e.message);
    throw e;
  };

  var visitorsNow = g => {
    var now = Date.now();
    return api('stats', { si: state.si, from: now - NOW_MS, to: now, bucket: 'minute' })
      .then(s => { if (g == gen) setNum('visitors-now', s.totals.sessions) },
        e => onFail(g, e, 'visitors now'));
  };

  var stats = g => {
    var [from, to] = span();
    return api('stats', { si: state.si, from, to, bucket: bucketFor(to - from) })
      .then(s => { if (g == gen) { showTotals(s); showChart(s) } }, e => onFail(g, e, 'stats'));
  };

  var load = () => {
    var g = ++gen;
    writeHash();
    body.dataset.ready = '0';
    problem('');
    if (!state.si) return;
    var [from, to] = span();
    Object.assign($('tables').dataset, { from, to, bots: state.bots });
    if (from >= to) {
      body.dataset.ready = 'error';
      return problem('The range must start before it ends.');
    }
    var jobs = [stats(g), visitorsNow(g)].concat(TABLES.map(([by]) =>
      api('breakdown', { si: state.si, by, from, to, limit: 10 })
        .then(b => { if (g == gen) showTable(by, b.rows) },
          e => { if (g == gen) note(sections[by], 'Not available: ' + e.message); return onFail(g, e, by) })));
    Promise.all(jobs.map(j => j.then(() => true, () => false))).then(ok => {
      if (g != gen || !token) return;
      body.dataset.ready = ok.every(Boolean) ? '1' : 'error';
      if (!started) { started = true; performance.mark('dashboard-ready') }
      follow(); // after the first paint: the stream holds a connection of its own
    });
  };

  var refreshFailed = false;
  var refresh = () => {
    if (!token || !state.si || body.dataset.ready == '0' || d.hidden) return;
    var g = gen;
    Promise.all([stats(g), visitorsNow(g)]).then(() => {
      if (g == gen && refreshFailed) problem('');
      refreshFailed = false;
    }, () => { refreshFailed = true });
  };

  // ---------------------------------------------------------------- live feed

  var setLive = (state, text) => {
    var el = $('live-status');
    el.dataset.state = state;
    el.textContent = text;
  };

  var OWN = /^(unixtimestamp|si|eid|sid|uid|ev|url)$/;

  var showEvent = (id, item) => {
    var e = item && item.event;
    if (!e || typeof e != 'object') return;
    var li = d.createElement('li'), time = d.createElement('time'), span = (cls, text) => {
      var s = d.createElement('span');
      s.className = cls;
      s.textContent = text;
      return s;
    };
    var at = new Date(+e.unixtimestamp);
    time.dateTime = isNaN(at) ? '' : at.toISOString();
    time.textContent = isNaN(at) ? '' : at.toLocaleTimeString();
    var props = Object.keys(e).filter(k => !OWN.test(k)).map(k => k + '=' + e[k]).join(' · ');
    var url = String(e.url || e.page || '');
    li.dataset.eid = e.eid || '';
    li.dataset.id = id || '';
    li.append(time, span('ev', String(e.ev || 'event')), span('url', url), span('props', props.slice(0, 400)));
    li.title = url;
    var feed = $('live');
    feed.prepend(li);
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
    $('live-empty').hidden = true;
  };

  var gap = () => { // a resumed stream had more to replay than the server keeps for it
    var li = d.createElement('li');
    li.className = 'gap';
    li.textContent = 'Some events of the time the stream was down are not shown (the listing, /api/v1/events, has them all).';
    $('live').prepend(li);
  };

  var frame = text => { // one Server-Sent Events frame
    var id = null, type = 'message', data = [];
    text.split('\n').forEach(line => {
      if (!line || line[0] == ':') return;
      var i = line.indexOf(':'), field = i < 0 ? line : line.slice(0, i);
      var value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
      if (field == 'id') id = value;
      else if (field == 'event') type = value;
      else if (field == 'data') data.push(value);
    });
    if (id != null) live.last = id;
    if (type == 'truncated') return gap();
    if (type != 'message' || !data.length) return;
    try { showEvent(id, JSON.parse(data.join('\n'))) } catch (e) {}
  };

  var stopLive = () => {
    clearTimeout(live.timer);
    if (live.ctl) live.ctl.abort();
    live.ctl = null;
    live.si = '';
  };

  var follow = () => { // (re)start the stream when the site changed
    if (live.si == state.si && live.ctl) return;
    stopLive();
    live.si = state.si;
    live.last = null;
    live.tries = 0;
    $('live').replaceChildren();
    $('live-empty').hidden = false;
    connect();
  };

  var connect = () => {
    var ctl = live.ctl = new AbortController(), si = live.si;
    var headers = { Authorization: 'Bearer ' + token };
    if (live.last != null) headers['Last-Event-ID'] = live.last;
    setLive('connecting', 'connecting…');
    fetch('api/v1/live?si=' + encodeURIComponent(si), {
      headers, signal: ctl.signal, cache: 'no-store', credentials: 'omit'
    }).then(r => {
      if (!r.ok) return r.json().catch(() => ({})).then(j => { throw failure(r.status, j.error || '' + r.status) });
      var reader = r.body.pipeThrough(new TextDecoderStream()).getReader(), buf = '';
      var pump = () => reader.read().then(chunk => {
        if (chunk.done) throw failure(0, 'the stream ended');
        if (live.tries || $('live-status').dataset.state != 'open') { live.tries = 0; setLive('open', 'connected') }
        var frames = (buf + chunk.value).replace(/\r\n?/g, '\n').split('\n\n');
        buf = frames.pop();
        frames.forEach(frame);
        return pump();
      });
      return pump();
    }).catch(e => {
      if (ctl.signal.aborted || ctl != live.ctl) return;
      if (e.status == 401) return signOut(e.message);
      var wait = Math.min(3e4, 1e3 * 2 ** live.tries++);
      setLive('waiting', 'reconnecting in ' + Math.round(wait / 1e3) + ' s');
      live.timer = setTimeout(connect, wait);
    });
  };

  // ---------------------------------------------------------------- signing in and out

  var showSignIn = reason => {
    $('signin').hidden = false;
    $('app').hidden = $('controls').hidden = true;
    $('signin-error').hidden = !reason;
    $('signin-error').textContent = reason ? 'Not signed in: ' + reason : '';
    $('token').focus();
  };

  var signOut = reason => {
    gen++;
    token = '';
    started = false;
    sessionStorage.removeItem(TOKEN);
    stopLive();
    clearInterval(refresher);
    delete body.dataset.ready;
    $('site').replaceChildren();
    Object.values(sections).forEach(tbody => tbody.replaceChildren());
    ['visitors-now', 'total-events', 'total-sessions', 'total-visitors'].forEach(id => {
      $(id).textContent = '–';
      delete $(id).dataset.value;
    });
    if (plot) { plot.destroy(); plot = null }
    $('chart').replaceChildren();
    $('live').replaceChildren();
    showSignIn(reason);
  };

  var showSites = sites => {
    var site = $('site');
    site.replaceChildren(...sites.map(s => new Option(s.si, s.si)));
    $('no-sites').hidden = sites.length > 0;
    if (!state.si && sites.length) {
      state.si = sites[0].si;
      load();
    }
    showChoice();
  };

  var start = () => {
    $('signin').hidden = true;
    $('app').hidden = $('controls').hidden = false;
    readHash();
    showChoice();
    if (state.si) load(); // the reports do not wait for the list of sites
    clearInterval(refresher);
    refresher = setInterval(refresh, REFRESH_MS);
    return api('sites').then(j => {
      sessionStorage.setItem(TOKEN, token);
      showSites(j.sites || []);
    }, e => {
      if (e.status == 401) return signOut(e.message);
      problem('sites: ' + e.message);
    });
  };

  // ---------------------------------------------------------------- wiring

  buildTables();
  new ResizeObserver(fit).observe($('chart'));
  $('signin-form').addEventListener('submit', e => {
    e.preventDefault();
    token = $('token').value.trim();
    $('token').value = '';
    if (/^[\x21-\x7e]+$/.test(token)) start();
    else signOut('a token is printable ASCII, without spaces');
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('site').addEventListener('change', e => { state.si = e.target.value; load() });
  $('range').addEventListener('change', e => {
    if (e.target.value == 'custom') { // from what was shown, to the end of this minute
      var [from, to] = span();
      state.from = local(from);
      state.to = local(to + MINUTE);
    }
    state.range = e.target.value;
    showChoice();
    load();
  });
  ['from', 'to'].forEach(id => $(id).addEventListener('change', e => {
    if (!e.target.value) return;
    state[id] = e.target.value;
    load();
  }));
  $('bots').addEventListener('change', e => { state.bots = e.target.checked; load() });
  w.addEventListener('hashchange', () => {
    if (!token) return;
    readHash();
    showChoice();
    load();
  });
  if (token) start();
  else showSignIn('');
})(window, document);
