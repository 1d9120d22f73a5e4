/*
 * wshub.js: a browser client of wshub's pub/sub protocol (wshub.v1).
 *
 * No dependencies, no build step: load it with a <script> tag and use the
 * global `WsHub`. A wshub server hands it out itself
 * (`Server::page("/wshub.js", "text/javascript", wshub::WSHUB_JS)`).
 *
 *   const hub = new WsHub("/pubsub");
 *   hub.on("state", (s) => console.log(s.state));
 *   const news = hub.subscribe("news", {
 *     message(data, meta) { console.log(meta.seq, data); },
 *     gap(info) { console.log("missed", info.missed); },
 *   });
 *   const seq = await hub.publish("news", { text: "hi" });
 *
 * It reconnects by itself, with exponential backoff and jitter, and
 * subscribes again from the last position each subscription saw, so a
 * dropped connection loses nothing the topic's history still keeps; what it
 * cannot recover is reported as a gap. The full reference is
 * docs/WSHUB_JS.md in the wshub repository.
 */
(function (global) {
  "use strict";

  var PROTOCOL = "wshub.v1";

  var DEFAULTS = {
    // First reconnection delay, in ms; it doubles with each failed attempt...
    minDelay: 250,
    // ...up to this, in ms. Each delay is drawn from [d/2, d] (jitter), so
    // that many clients cut at once do not all come back at once.
    maxDelay: 10000,
    // A connection that stayed open this long (ms) counts as a success:
    // the next drop starts again from minDelay.
    stableAfter: 5000,
    // How long a command waits for its reply (ms) before it fails with
    // code "timeout".
    timeout: 10000,
    // Subprotocols offered.
    protocols: [PROTOCOL],
  };

  /** A failed command: `code` is one of the protocol's error codes, or
   * "disconnected" / "timeout" for failures on this side. */
  function WsHubError(code, message) {
    var err = new Error(message || code);
    err.name = "WsHubError";
    err.code = code;
    Object.setPrototypeOf(err, WsHubError.prototype);
    return err;
  }
  WsHubError.prototype = Object.create(Error.prototype);
  WsHubError.prototype.constructor = WsHubError;

  /** A ws: or wss: URL for one given relative to the page. */
  function socketUrl(url) {
    var parsed = new URL(url, global.location ? global.location.href : undefined);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    if (parsed.protocol === "https:") parsed.protocol = "wss:";
    return parsed.href;
  }

  function call(fn, self, args) {
    if (typeof fn !== "function") return;
    try {
      fn.apply(self, args);
    } catch (err) {
      // A handler's mistake must not stop the client.
      setTimeout(function () { throw err; }, 0);
    }
  }

  /** One topic this client receives; made by `WsHub#subscribe`. */
  function Subscription(hub, topic, handlers) {
    this.hub = hub;
    this.topic = topic;
    this.handlers = handlers || {};
    // The last message delivered: {epoch, seq}, or null.
    this.last = null;
    // Where to resume from when nothing was delivered yet.
    this.start = this.handlers.since || null;
    this.active = true;
    this.subscribed = false;
    var self = this;
    this.ready = new Promise(function (resolve, reject) {
      self._resolve = resolve;
      self._reject = reject;
    });
    // `ready` may fail (a bad topic name); that is reported to the `error`
    // handler too, so an unobserved rejection is not an error here.
    this.ready.catch(function () {});
  }

  /** The position to resume from: {epoch, seq}, or null. */
  Subscription.prototype.position = function () {
    return this.last || this.start;
  };

  /** Stops receiving the topic. Resolves once the server confirmed (at
   * once when not connected). */
  Subscription.prototype.unsubscribe = function () {
    return this.hub._unsubscribe(this);
  };

  /**
   * A client: `new WsHub(url, options)` connects at once and keeps
   * reconnecting until `close()`. `url` is a ws:, wss:, http: or https: URL,
   * or a path relative to the page (such as "/pubsub"), or a function that
   * returns one (called at each connection, to change a query parameter).
   */
  function WsHub(url, options) {
    this.url = url;
    this.options = {};
    var key;
    for (key in DEFAULTS) this.options[key] = DEFAULTS[key];
    for (key in options || {}) this.options[key] = options[key];
    // "connecting", "open", "reconnecting" or "closed".
    this.state = "connecting";
    // This connection's client id, from the first subscribe reply; null
    // until then. It changes with each connection.
    this.clientId = null;
    this._subs = new Map();
    this._pending = new Map();
    this._listeners = {};
    this._nextId = 1;
    this._attempt = 0;
    this._timer = null;
    this._ws = null;
    this._openedAt = 0;
    this._closed = false;
    this._open();
  }

  WsHub.Error = WsHubError;
  WsHub.PROTOCOL = PROTOCOL;

  /** Listens to "state", "gap", "client" or "error"; returns a function that
   * stops listening. */
  WsHub.prototype.on = function (event, fn) {
    var list = this._listeners[event] || (this._listeners[event] = []);
    list.push(fn);
    return function () {
      var at = list.indexOf(fn);
      if (at >= 0) list.splice(at, 1);
    };
  };

  WsHub.prototype._emit = function (event, value) {
    var list = (this._listeners[event] || []).slice();
    for (var i = 0; i < list.length; i++) call(list[i], this, [value]);
  };

  WsHub.prototype._setState = function (state, detail) {
    this.state = state;
    var event = { state: state };
    for (var key in detail || {}) event[key] = detail[key];
    this._emit("state", event);
  };

  WsHub.prototype._open = function () {
    clearTimeout(this._timer);
    this._timer = null;
    if (this._closed) return;
    this._setState("connecting", { attempt: this._attempt });
    var self = this;
    var ws;
    try {
      ws = new WebSocket(socketUrl(typeof this.url === "function" ? this.url() : this.url),
        this.options.protocols);
    } catch (err) {
      // A malformed URL: retrying cannot help.
      this._closed = true;
      this._setState("closed", { code: 0, reason: String(err && err.message) });
      this._emit("error", err);
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      if (ws !== self._ws) return;
      self._openedAt = Date.now();
      self._setState("open", {});
      self._subs.forEach(function (sub) { self._subscribe(sub); });
    };
    ws.onmessage = function (event) {
      if (ws === self._ws) self._receive(event.data);
    };
    ws.onclose = function (event) {
      if (ws !== self._ws) return;
      self._ws = null;
      self._dropped(event.code, event.reason);
    };
  };

  WsHub.prototype._dropped = function (code, reason) {
    var pending = this._pending;
    this._pending = new Map();
    pending.forEach(function (request) {
      clearTimeout(request.timer);
      // A publish in flight may or may not have been published.
      request.reject(WsHubError("disconnected", "the connection closed before the reply"));
    });
    this._subs.forEach(function (sub) { sub.subscribed = false; });
    this.clientId = null;
    if (this._closed) {
      this._setState("closed", { code: code, reason: reason });
      return;
    }
    if (this._openedAt && Date.now() - this._openedAt >= this.options.stableAfter) {
      this._attempt = 0;
    }
    this._openedAt = 0;
    var ceiling = Math.min(this.options.maxDelay,
      this.options.minDelay * Math.pow(2, this._attempt));
    var delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this._attempt += 1;
    this._setState("reconnecting", {
      code: code, reason: reason, delay: delay, attempt: this._attempt,
    });
    var self = this;
    this._timer = setTimeout(function () { self._open(); }, delay);
  };

  /** Connects again now, keeping every subscription and its position (to
   * pick up a new URL from the `url` function, say). */
  WsHub.prototype.reconnect = function () {
    if (this._closed) return;
    var ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onclose = null;
      ws.close(1000, "reconnecting");
      this._dropped(1000, "reconnecting");
    }
    this._attempt = 0;
    this._open();
  };

  /** Closes the connection for good: no more reconnection. */
  WsHub.prototype.close = function () {
    this._closed = true;
    clearTimeout(this._timer);
    var ws = this._ws;
    if (ws && ws.readyState <= 1) {
      ws.close(1000, "bye");
    } else {
      this._ws = null;
      this._dropped(1000, "bye");
    }
  };

  /** Sends one command; resolves with the reply, or rejects with a WsHubError. */
  WsHub.prototype._request = function (fields) {
    var ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      return Promise.reject(WsHubError("disconnected", "not connected"));
    }
    var id = this._nextId++;
    var command = { id: id };
    for (var key in fields) command[key] = fields[key];
    var self = this;
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () {
        self._pending.delete(id);
        reject(WsHubError("timeout", "no reply to " + fields.op + " within " +
          self.options.timeout + " ms"));
      }, self.options.timeout);
      self._pending.set(id, { resolve: resolve, reject: reject, timer: timer });
      ws.send(JSON.stringify(command));
    });
  };

  WsHub.prototype._receive = function (text) {
    var frame;
    try {
      frame = JSON.parse(text);
    } catch (err) {
      this._emit("error", WsHubError("bad_frame", "not JSON: " + String(text).slice(0, 100)));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if ("id" in frame && "ok" in frame) {
      var request = this._pending.get(frame.id);
      if (!request) {
        if (!frame.ok) {
          var e = frame.error || {};
          this._emit("error", WsHubError(e.code || "bad_request", e.message));
        }
        return;
      }
      this._pending.delete(frame.id);
      clearTimeout(request.timer);
      if (frame.ok) {
        request.resolve(frame);
      } else {
        var error = frame.error || {};
        request.reject(WsHubError(error.code || "bad_request", error.message));
      }
      return;
    }
    var sub = this._subs.get(frame.topic);
    if (!sub || !sub.active) return;
    switch (frame.op) {
      case "message":
        // Within an epoch seq only grows: a repeat is dropped here, so a
        // handler sees each message once.
        if (sub.last && sub.last.epoch === frame.epoch && frame.seq <= sub.last.seq) return;
        sub.last = { epoch: frame.epoch, seq: frame.seq };
        call(sub.handlers.message, sub, [frame.data,
          { topic: frame.topic, epoch: frame.epoch, seq: frame.seq }]);
        break;
      case "gap":
        this._gap(sub, { topic: frame.topic, missed: frame.missed, reason: "missed" });
        break;
      case "join":
        call(sub.handlers.join, sub, [{ client: frame.client, info: frame.info }]);
        break;
      case "leave":
        call(sub.handlers.leave, sub, [{ client: frame.client }]);
        break;
      default:
        break;
    }
  };

  WsHub.prototype._gap = function (sub, info) {
    call(sub.handlers.gap, sub, [info]);
    this._emit("gap", info);
  };

  /**
   * Receives `topic` with `handlers` (each optional):
   *   message(data, {topic, epoch, seq}), gap({topic, missed, reason}),
   *   join({client, info}), leave({client}),
   *   subscribed({epoch, seq, recovered, resumed}), error(WsHubError);
   * and `since: {epoch, seq}` to start after a known position.
   * Returns a Subscription at once; its `ready` promise settles with the
   * first reply. It is subscribed again after every reconnection.
   */
  WsHub.prototype.subscribe = function (topic, handlers) {
    if (this._subs.has(topic)) {
      throw WsHubError("bad_request", "already subscribed to " + JSON.stringify(topic));
    }
    var sub = new Subscription(this, topic, handlers);
    this._subs.set(topic, sub);
    if (this._ws && this._ws.readyState === 1) this._subscribe(sub);
    return sub;
  };

  WsHub.prototype._subscribe = function (sub) {
    var self = this;
    var since = sub.position();
    var fields = { op: "subscribe", topic: sub.topic };
    if (since) fields.since = { epoch: since.epoch, seq: since.seq };
    var ws = this._ws;
    this._request(fields).then(function (reply) {
      if (!sub.active) return;
      if (reply.client && reply.client !== self.clientId) {
        self.clientId = reply.client;
        self._emit("client", reply.client);
      }
      sub.subscribed = true;
      if (since && reply.epoch !== since.epoch) {
        // The topic's history started afresh: what was missed of the old
        // one cannot be counted.
        self._gap(sub, { topic: sub.topic, missed: null, reason: "epoch" });
      }
      if (!sub.last || sub.last.epoch !== reply.epoch) {
        sub.start = { epoch: reply.epoch, seq: reply.seq };
        if (sub.last && sub.last.epoch !== reply.epoch) sub.last = null;
      }
      call(sub.handlers.subscribed, sub, [{
        epoch: reply.epoch, seq: reply.seq, recovered: reply.recovered, resumed: !!since,
      }]);
      sub._resolve(reply);
    }, function (err) {
      if (!sub.active) return;
      if (err.code === "disconnected") return; // subscribed again on reconnection
      if ((err.code === "unavailable" || err.code === "timeout") && ws === self._ws) {
        // The broker may come back: try again on this connection.
        setTimeout(function () {
          if (sub.active && !sub.subscribed && ws === self._ws) self._subscribe(sub);
        }, self.options.minDelay * 4);
        call(sub.handlers.error, sub, [err]);
        return;
      }
      // bad_topic, not_allowed, limit...: retrying cannot help.
      sub.active = false;
      if (self._subs.get(sub.topic) === sub) self._subs.delete(sub.topic);
      call(sub.handlers.error, sub, [err]);
      self._emit("error", err);
      sub._reject(err);
    });
  };

  WsHub.prototype._unsubscribe = function (sub) {
    if (!sub.active) return Promise.resolve();
    sub.active = false;
    if (this._subs.get(sub.topic) === sub) this._subs.delete(sub.topic);
    if (!this._ws || this._ws.readyState !== 1) return Promise.resolve();
    return this._request({ op: "unsubscribe", topic: sub.topic }).then(function () {});
  };

  /** Publishes `data` (any JSON value) to `topic`; resolves with its seq.
   * Rejects with a WsHubError: the server's code ("limit", "bad_topic",
   * ...), or "disconnected" when not connected or cut before the reply (the
   * message may then have been published), or "timeout". */
  WsHub.prototype.publish = function (topic, data) {
    return this._request({ op: "publish", topic: topic, data: data === undefined ? null : data })
      .then(function (reply) { return reply.seq; });
  };

  /** Who is subscribed to `topic` now: resolves with [{client, info}]. */
  WsHub.prototype.presence = function (topic) {
    return this._request({ op: "presence", topic: topic })
      .then(function (reply) { return reply.members || []; });
  };

  /** The latest kept messages of `topic`, oldest first: resolves with
   * {epoch, messages: [{seq, data}]}. `limit` is optional. */
  WsHub.prototype.history = function (topic, limit) {
    var fields = { op: "history", topic: topic };
    if (limit !== undefined) fields.limit = limit;
    return this._request(fields).then(function (reply) {
      return {
        epoch: reply.epoch,
        messages: (reply.messages || []).map(function (m) {
          return { seq: m.seq, data: m.data };
        }),
      };
    });
  };

  global.WsHub = WsHub;
})(typeof window !== "undefined" ? window : globalThis);
