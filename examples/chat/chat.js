// The chat page: rooms are topics of the pub/sub protocol, spoken through
// wshub.js. Everything a peer sends is put on the page as text
// (textContent), never as markup.
(function () {
  "use strict";

  var DEFAULT_ROOM = "lobby";
  var NAME_KEY = "wshub-chat-name";
  var $ = function (id) { return document.getElementById(id); };

  // The name lives in this tab's sessionStorage: two tabs are two people,
  // and a reload keeps the name. Without one, the server names us user$id.
  var myName = sessionStorage.getItem(NAME_KEY) || "";
  // Every client id this page has had: one per connection.
  var myIds = new Set();
  var rooms = new Map();
  var current = null;

  var hub = new WsHub(function () {
    return "/pubsub" + (myName ? "?name=" + encodeURIComponent(myName) : "");
  });

  function line(room, kind, parts, seq) {
    var div = document.createElement("div");
    div.className = "line " + kind;
    if (seq !== undefined) div.dataset.seq = String(seq);
    parts.forEach(function (part) {
      if (typeof part === "string") {
        div.appendChild(document.createTextNode(part));
      } else {
        var span = document.createElement("span");
        span.className = part.cls;
        span.textContent = part.text;
        div.appendChild(span);
      }
    });
    var box = room.lines;
    var atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    box.appendChild(div);
    if (room === current) {
      if (atBottom || kind === "message") $("lines").scrollTop = $("lines").scrollHeight;
    } else if (kind === "message") {
      room.unread += 1;
      renderRooms();
    }
  }

  function nameOf(info, client) {
    return info && typeof info.name === "string" ? info.name : client;
  }

  function renderRooms() {
    var list = $("rooms");
    list.textContent = "";
    rooms.forEach(function (room) {
      var li = document.createElement("li");
      li.dataset.room = room.name;
      if (room === current) li.className = "current";
      var label = document.createElement("span");
      label.textContent = "#" + room.name;
      li.appendChild(label);
      if (room.unread > 0) {
        var badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(room.unread);
        li.appendChild(badge);
      }
      li.addEventListener("click", function () { show(room); });
      list.appendChild(li);
    });
  }

  function renderMembers() {
    var list = $("members");
    list.textContent = "";
    if (!current) {
      $("count").textContent = "";
      return;
    }
    var members = Array.from(current.members.entries()).sort(function (a, b) {
      return a[1].localeCompare(b[1]);
    });
    members.forEach(function (entry) {
      var li = document.createElement("li");
      li.textContent = entry[1];
      li.dataset.client = entry[0];
      if (myIds.has(entry[0])) {
        li.className = "me";
        li.textContent = entry[1] + " (you)";
      }
      list.appendChild(li);
    });
    $("count").textContent = "(" + members.length + ")";
  }

  function show(room) {
    current = room;
    rooms.forEach(function (r) { r.lines.hidden = r !== room; });
    if (room) {
      room.unread = 0;
      $("room-title").textContent = "#" + room.name;
      $("lines").scrollTop = $("lines").scrollHeight;
    } else {
      $("room-title").textContent = "no room: join one";
    }
    $("text").disabled = !room;
    $("leave").disabled = !room;
    renderRooms();
    renderMembers();
    if (room) $("text").focus();
  }

  function refreshMembers(room) {
    hub.presence(room.topic).then(function (members) {
      if (!room.sub.active) return;
      room.members = new Map();
      members.forEach(function (m) {
        room.members.set(m.client, nameOf(m.info, m.client));
        if (m.client === hub.clientId && m.info && typeof m.info.name === "string") {
          learnName(m.info.name);
        }
      });
      if (room === current) renderMembers();
    }, function (err) {
      line(room, "error", ["members unavailable (" + err.code + "): " + err.message]);
    });
  }

  function learnName(name) {
    if (name === myName) return;
    myName = name;
    sessionStorage.setItem(NAME_KEY, name);
    if (document.activeElement !== $("name")) $("name").value = name;
  }

  function join(name) {
    var existing = rooms.get(name);
    if (existing) {
      show(existing);
      return;
    }
    var lines = document.createElement("div");
    lines.className = "room";
    lines.dataset.room = name;
    $("lines").appendChild(lines);
    var room = { name: name, topic: "room:" + name, lines: lines, members: new Map(), unread: 0 };
    rooms.set(name, room);
    room.sub = hub.subscribe(room.topic, {
      subscribed: function () { refreshMembers(room); },
      message: function (data, meta) {
        if (data && typeof data.text === "string") {
          var who = typeof data.name === "string" && data.name ? data.name : "someone";
          line(room, "message", [{ cls: "name", text: who }, " said: ", { cls: "text", text: data.text }], meta.seq);
        } else {
          line(room, "error", ["(a message this page cannot show)"], meta.seq);
        }
      },
      join: function (member) {
        if (myIds.has(member.client) || room.members.has(member.client)) return;
        room.members.set(member.client, nameOf(member.info, member.client));
        line(room, "system", [nameOf(member.info, member.client) + " joined"]);
        if (room === current) renderMembers();
      },
      leave: function (member) {
        var name = room.members.get(member.client);
        if (!room.members.delete(member.client)) return;
        if (!myIds.has(member.client)) line(room, "system", [name + " left"]);
        if (room === current) renderMembers();
      },
      gap: function (info) {
        if (info.reason === "epoch") {
          line(room, "gap", ["\u2014 the room's history started afresh (a server restart?); earlier messages may be missing \u2014"]);
        } else {
          line(room, "gap", ["\u2014 " + info.missed + " message" + (info.missed === 1 ? "" : "s") + " missed \u2014"]);
        }
      },
      error: function (err) {
        line(room, "error", ["cannot join #" + name + " (" + err.code + "): " + err.message]);
      },
    });
    room.sub.ready.catch(function () {
      rooms.delete(name);
      if (current === room) show(rooms.values().next().value || null);
      else renderRooms();
    });
    show(room);
  }

  function leave(room) {
    room.sub.unsubscribe();
    rooms.delete(room.name);
    room.lines.remove();
    show(rooms.values().next().value || null);
  }

  function send() {
    var input = $("text");
    var text = input.value;
    if (!current || text.trim() === "") return;
    var room = current;
    input.value = "";
    hub.publish(room.topic, { name: myName, text: text }).catch(function (err) {
      line(room, "error", ["not sent (" + err.code + "): " + err.message]);
      if (input.value === "") input.value = text;
    });
  }

  hub.on("client", function (id) { myIds.add(id); });
  hub.on("state", function (s) {
    var badge = $("state");
    badge.className = "state " + s.state;
    if (s.state === "open") badge.textContent = "online";
    else if (s.state === "reconnecting") {
      badge.textContent = "offline: retrying in " + (s.delay / 1000).toFixed(1) + " s";
    } else if (s.state === "connecting") badge.textContent = "connecting";
    else badge.textContent = "closed";
  });

  $("text").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("send-form").addEventListener("submit", function (event) {
    event.preventDefault();
    send();
  });
  $("name-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var name = $("name").value.trim().slice(0, 32);
    if (!name || name === myName) return;
    myName = name;
    sessionStorage.setItem(NAME_KEY, name);
    // The name travels with the connection: connect again under it. Each
    // room resumes where it was, so nothing is missed meanwhile.
    hub.reconnect();
  });
  $("join-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var input = $("room-name");
    var name = input.value.trim();
    if (!name || !input.checkValidity()) return;
    input.value = "";
    join(name);
  });
  $("leave").addEventListener("click", function () {
    if (current) leave(current);
  });

  $("name").value = myName;
  join(DEFAULT_ROOM);
})();
