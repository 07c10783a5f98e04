/*! ot.js, otserver's browser tracker. Plain ES2017, no dependencies, no cookies.
 * <script async src="https://HOST/ot.js" data-site="example.com"></script>
 * Options [default]:
 *  data-site             the site, sent as si [location.hostname]
 *  data-endpoint         server base URL; events go to ENDPOINT/batch [this script's origin]
 *  data-session-timeout  minutes (fractions work) without events that end a session [30]
 *  data-flush-interval   milliseconds an event waits before the queue is sent [1000]
 *  data-batch-size       queued events sent at once, without waiting [20]
 *  data-respect-dnt      present (not "false"): nothing is sent or stored when Do Not Track
 *                        (navigator.doNotTrack "1") or Global Privacy Control is on [absent]
 * API (before load too: window.ot = window.ot || []; ot.push([...]); a queued identify comes
 * before the load's pageview, other commands after it):
 *  ot.track(name, props)  an event: ev=name and props (string, number, boolean values)
 *  ot.identify(uid)       this and later loads' events carry uid (1-255 characters)
 *  ot.push(['track', name, props], ['identify', uid])
 * Each event: si, sid, uid, ev, idempotency_key (random; a retry resends it). Pageviews: on
 * load, on a URL change (less #fragment) by pushState, replaceState or popstate, on return
 * from the back/forward cache; with url, title, referrer (document.referrer; in-app: the last
 * pageview's url), screen (1280x720), lang (navigator.language); no empty title or referrer.
 * Values are cut to 8 KiB; 240 props at most, bad or reserved names left out; events over 60 KB
 * dropped. Ids are made here, sent as given. localStorage (blocked: memory): ot_uid, ot_sid,
 * ot_seen, ot_q. Retries (network error, 408, 429, 5xx): after Retry-After if readable, else
 * 1 s doubling to 60 s. Page hidden: sendBeacon; unsent: ot_q, sent by the next load (24 h).
 * A second copy does nothing. Never throws.
 */
(function (w, d, nav) {
  'use strict';
  var noop = () => {};
  var safe = f => (...a) => { try { return f(...a) } catch (e) {} };
  safe(() => {
    var pre = w.ot;
    if (pre && pre._ot) return; // a second copy
    var api = w.ot = { _ot: 1, track: noop, identify: noop, push: noop };
    var tag = d.currentScript || d.querySelector('script[src*="ot.js"]') || d.createElement('i');
    var attr = n => tag.getAttribute('data-' + n);
    var num = (n, def) => { var v = parseFloat(attr(n)); return v >= 0 ? v : def };
    var dnt = attr('respect-dnt');
    if (dnt != null && dnt != 'false' &&
        (nav.doNotTrack == '1' || nav.globalPrivacyControl)) return;

    var site = attr('site') || location.hostname;
    var url = (attr('endpoint') || new URL(tag.src || '', location.href).origin)
      .replace(/\/+$/, '') + '/batch';
    var timeout = num('session-timeout', 30) * 6e4;
    var every = num('flush-interval', 1e3);
    var size = Math.max(1, num('batch-size', 20));
    var NAME = /^[\x21-\x7e]{1,128}$/;
    var RESERVED = /^(si|sid|uid|ev|eid|unixtimestamp|idempotency_key)$/;
    var MAX = 6e4; // characters in a line, in a request (a beacon carries 64 KiB)

    var mem = {}; // if localStorage is blocked
    var get = k => { try { var v = localStorage.getItem(k); if (v != null) return v } catch (e) {} return mem[k] };
    var put = (k, v) => {
      mem[k] = v;
      try { v == null ? localStorage.removeItem(k) : localStorage.setItem(k, v) } catch (e) {}
    };

    var uuid = () => {
      try { return crypto.randomUUID() } catch (e) {} // secure contexts only
      var b = crypto.getRandomValues(new Uint8Array(16)), h = '', i;
      b[6] = b[6] & 15 | 64; // version 4
      b[8] = b[8] & 63 | 128;
      for (i = 0; i < 16; i++) h += (i > 3 && i < 11 && !(i & 1) ? '-' : '') + (b[i] + 256).toString(16).slice(1);
      return h;
    };

    var ids = () => { // [sid, uid] of an event made now
      var now = Date.now(), uid = get('ot_uid'), sid = get('ot_sid');
      if (!uid) put('ot_uid', uid = uuid());
      if (!sid || !(now - get('ot_seen') <= timeout)) put('ot_sid', sid = uuid());
      put('ot_seen', '' + now);
      return [sid, uid];
    };

    var enc = v => {
      try { return encodeURIComponent(v) } catch (e) { // a lone surrogate
        return encodeURIComponent(v.replace(/[\ud800-\udfff]/g, '\ufffd'));
      }
    };
    var buf = new Uint8Array(8192), utf8 = new TextEncoder();
    // at most 8 KiB of UTF-8 (the server's bound), never half a character
    var clip = v => (v = '' + v).length < 2731 ? v : v.slice(0, utf8.encodeInto(v, buf).read);

    // The queue: [time queued, line], a line one url-encoded event. A body is lines, text/plain,
    // for fetch and beacon alike: no preflight, and a beacon may carry nothing else cross-origin.
    var queue = [], busy = 0, tries = 0, timer = 0;

    var event = (name, props) => {
      var id = ids(), parts = [], n = 0;
      var add = (k, v) => parts.push(enc(k) + '=' + enc(clip(v)));
      add('si', site); add('sid', id[0]); add('uid', id[1]); add('ev', name);
      add('idempotency_key', uuid());
      if (props && typeof props == 'object') Object.keys(props).forEach(k => {
        var v = props[k], t = typeof v;
        if ((t == 'string' || t == 'number' || t == 'boolean') && NAME.test(k) &&
            !RESERVED.test(k) && n++ < 240) add(k, v);
      });
      var line = parts.join('&');
      if (line.length >= MAX) return;
      if (queue.push([Date.now(), line]) > 500) queue.shift();
      schedule();
    };

    var take = () => { // the queue's head that fits one request
      var out = [], n = 0, i;
      for (i = 0; i < queue.length && i < 100 && (n += queue[i][1].length + 1) <= MAX; i++) out.push(queue[i]);
      return out;
    };
    var body = batch => batch.map(e => e[1]).join('\n');
    var done = batch => { queue = queue.filter(e => batch.indexOf(e) < 0) };
    var wait = ms => { clearTimeout(timer); timer = setTimeout(tick, ms) };
    var schedule = () => { // a waiting retry keeps its time
      if (busy || tries || !queue.length) return;
      if (queue.length >= size) flush();
      else if (!timer) wait(every);
    };
    var retry = after => {
      var ms = Math.min(6e4, 1e3 * 2 ** tries++) * (1 + Math.random() / 4);
      after = isNaN(+after) ? Date.parse(after) - Date.now() : after * 1e3;
      wait(after > ms ? Math.min(after, 36e5) : ms);
    };
    var flush = () => {
      clearTimeout(timer); timer = 0;
      if (busy) return;
      if (!queue.length) return tries = 0;
      var batch = take();
      busy = 1;
      fetch(url, { method: 'POST', body: body(batch), credentials: 'omit' }).then(r => {
        var s = r.status;
        if (s == 408 || s == 429 || s >= 500) return busy = 0, retry(r.headers.get('Retry-After'));
        return (s == 400 ? r.text() : Promise.resolve('')).then(t => {
          var m = /^line (\d+)/.exec(t);
          busy = tries = 0;
          done(m ? [batch[m[1] - 1]] : batch);
          schedule();
        });
      }).catch(() => { busy = 0; retry() });
    };
    var tick = safe(flush);

    var saved = () => {
      try { var q = JSON.parse(get('ot_q')) } catch (e) {}
      return Array.isArray(q) ? q.filter(e => e && Date.now() - e[0] < 864e5 && typeof e[1] == 'string') : [];
    };
    var hide = safe(() => {
      var keep = [], batch, b, sent;
      while ((batch = take()).length) {
        b = body(batch);
        try { sent = nav.sendBeacon(url, b) } catch (e) { sent = 0 }
        if (!sent) fetch(url, { method: 'POST', body: b, credentials: 'omit', keepalive: true }).catch(noop);
        if (!sent || tries) keep = keep.concat(batch);
        done(batch);
      }
      if (keep.length) put('ot_q', JSON.stringify(saved().concat(keep).slice(-500)));
    });

    var last = '';
    var here = h => h.split('#')[0];
    var pageview = referrer => {
      var p = { url: location.href, screen: screen.width + 'x' + screen.height, lang: nav.language };
      if (d.title) p.title = d.title;
      if (referrer) p.referrer = referrer;
      last = location.href;
      event('pageview', p);
    };
    // after the app had a moment to set its title
    var moved = () => setTimeout(safe(() => { if (here(location.href) != here(last)) pageview(last) }));

    var track = (name, props) => { if (name != null && (name += '')) event(name, props) };
    var identify = uid => { if (uid != null && (uid += '') && uid.length < 256) put('ot_uid', uid) };
    var first = c => c && c[0] == 'identify';
    var run = c => first(c) ? identify(c[1]) : c && c[0] == 'track' && track(c[1], c[2]);

    var start = safe(() => {
      queue = saved().concat(queue);
      put('ot_q', null);
      var cmds = Array.isArray(pre) ? pre : [];
      cmds.filter(first).forEach(safe(run));
      pageview(d.referrer);
      cmds.filter(c => !first(c)).forEach(safe(run));
      schedule();
    });

    api.track = safe(track);
    api.identify = safe(identify);
    api.push = (...cmds) => cmds.forEach(safe(run));
    ['pushState', 'replaceState'].forEach(m => {
      var orig = history[m];
      history[m] = function () {
        var r = orig.apply(this, arguments);
        moved();
        return r;
      };
    });
    w.addEventListener('popstate', moved);
    w.addEventListener('pageshow', safe(e => { if (e.persisted) pageview() }));
    w.addEventListener('pagehide', hide);
    d.addEventListener('visibilitychange', () => { if (d.visibilityState == 'hidden') hide() });
    if (d.prerendering) d.addEventListener('prerenderingchange', start, { once: true });
    else start();
  })();
})(window, document, navigator);
