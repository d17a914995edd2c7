// The chat page: one WebSocket to chatd (/ws), JSON messages both ways (see README,
// "The web chat"). What the page shows must be true, so it tells these cases apart:
//
// - open: chatd answers. The socket is kept across a crash of chatd, so a crash by
//   itself never closes it: nothing to reload, nothing lost.
// - waiting: the socket is open but chatd does not answer (dead, stopped, restoring).
//   The page sends {"type":"ping"} after each message and every `heartbeat_ms` while
//   idle; chatd answers {"type":"pong"} once it has handled everything sent before it
//   (commands are handled in order). A ping unanswered for `answer_ms` means
//   waiting: what the user types waits and is handled when chatd is back, and the
//   page marks those messages as waiting until they are confirmed.
// - lost (badge "reconnecting…"): the socket closed without a goodbye (a proxy
//   restarted, the network changed, holderd and chatd both gone), or, with a session,
//   a ping unanswered and nothing at all heard for `dead_ms` (a half-open connection
//   looks just like a stopped chatd, so only a silence longer than any restore gives
//   the socket up; it is left unclosed: a close frame would end the session). The page
//   reconnects by itself with full-jitter exponential backoff: try k waits
//   random(0, min(cap, base * 2^k)), and no less than a `retry_after` chatd asked for
//   (`busy`); after `retries` tries it stops, with a button to try again (offline).
// - ended: the server said goodbye ({"type":"bye"}: a quit, or `chatctl drain`).
//   The page does not reconnect: the user starts again with a button.
//
// The session (issue 28). Once the page has a name it asks chatd for a session and
// keeps its token in sessionStorage: per tab, so a reload of the tab takes it back too.
// From the moment it asks, the page numbers every chat command it sends (1, 2, 3 …,
// pings included, as chatd counts them) and keeps each message, nick, pair and who in
// `outbox` until chatd has handled it: a pong shows everything sent before its ping handled
// (and forgets what was sent before the session), and {"type":"handled","count":h} (the answer to the acks the page sends after every
// ACK_EVERY messages shown or sent, or ACK_IDLE ms after the last) everything up to
// h. On a new connection the page sends {"type":"resume","token":T,"n":<the n of the
// last message shown>}; chatd answers {"type":"resumed",…,"handled":h} and sends again
// every message after n, once. The page then sends again what is in the outbox after h
// (numbered on from h, pings left out: they only asked whether chatd answered), so what
// was typed while away is sent once; a message whose n is not above the last shown is
// dropped (a guard: chatd sends each once). The log just goes on: no note, no gap. A
// session chatd no longer knows (`unknown-session`: its grace ran out, or chatd's journal
// was lost with holderd) falls back to a new client, which takes the name and the
// pairing again and a new session; the log says so and marks what was not confirmed.
// A page being left (pagehide) shows nothing more, so the next page of the tab resumes
// from the last message this one really showed.
//
// State: `link` owns the socket and the connection's phase, `session` the token and the
// numbering, `outbox` the commands not yet handled; `remember()` writes the last two to
// sessionStorage (what a reload needs). window.chat is what the page has seen, for tests
// to read. The timings come from the page's query string (for tests): retries,
// backoff_ms, backoff_cap_ms, answer_ms, heartbeat_ms, dead_ms.
"use strict";

const $ = (id) => document.getElementById(id);

function setting(name, fallback) {
  const value = Number(new URLSearchParams(location.search).get(name));
  return Number.isFinite(value) && value > 0 ? value : fallback;
}
const RETRIES = setting("retries", 8);            // reconnection tries before giving up
const BACKOFF = setting("backoff_ms", 1000);      // the first try waits up to this
const BACKOFF_CAP = setting("backoff_cap_ms", 15000);
const ANSWER = setting("answer_ms", 2500);        // a ping unanswered this long: waiting
const HEARTBEAT = setting("heartbeat_ms", 10000); // an idle page pings this often
// Unanswered and silent this long, a session's socket is given up and the session resumed
// on a new one: longer than a restore of chatd takes (a crash must not cost a reconnection), short
// enough that a half-open connection does not keep the user waiting long.
const DEAD = setting("dead_ms", 20000);
const ACK_EVERY = 16;                             // messages shown and commands sent between acks
const ACK_IDLE = 2000;                            // or this long after the last activity
const STORE = "chat.session";                     // the sessionStorage key

const PROMISE = "Your connection survives a crash of the server: nothing to reload, nothing lost.";
const FOOTERS = {
  connecting: "Connecting to the server…",
  open: PROMISE,
  waiting: PROMISE,
  lost: "The connection is gone: a new one is a new client. It takes your name and pairing again, " +
        "but messages in flight on the old one are lost.",
  offline: "Not connected. Reconnecting makes a new client: messages in flight on the old connection are lost.",
  ended: "The server ended this chat. Starting again makes a new connection.",
};
const SESSION_FOOTERS = {
  lost: "Reconnecting: the server keeps this chat for a while, and it goes on where it left off. " +
        "What you type meanwhile is sent once.",
  offline: "Not connected. The server keeps this chat for a while: reconnecting takes it back, " +
           "with what you typed.",
};

window.chat = { opens: 0, closes: 0, messages: [], errors: [], nick: null, peer: null, paired: null,
                state: "connecting", attempts: 0, pending: 0, session: false, resumes: 0, fallbacks: 0,
                abandoned: 0, busy: 0, dropped: 0, lastN: 0, sent: 0, kept: 0 };

// -- the connection: one owner --------------------------------------------------------------
const link = {
  socket: null,
  phase: "closed",     // closed | open | resuming (resume sent, no answer yet) | ended (bye seen)
  retryTimer: null,
  floor: 0,            // ms: the next try waits at least this (chatd said busy)
  resumeAt: 0,         // when the resume was sent
  heardAt: 0,          // when the socket last brought anything
};

// -- the session and what is kept: one owner, written to sessionStorage ---------------------
const session = {
  token: null,         // chatd's token, once it answered {"type":"session"}
  asked: false,        // a {"type":"session"} is on its way: commands are numbered from now
  numbered: 0,         // the number of the last chat command sent (or kept) since the session began
  lastN: 0,            // the n of the last message shown
  ackedN: 0,           // the n of the last ack sent
  unacked: 0,          // messages shown and commands sent since the last ack
  ackTimer: null,
  off: false,          // chatd keeps no sessions (a cluster): this page is a plain client
};
let sequence = 0;      // every command's place in order, for pongs (which know no numbers)
// Commands not known handled, oldest first: {seq, number, message, item, transmitted}
// (transmitted: sent on some connection; one never sent is always sent on resume).
let outbox = [];
let pings = [];        // unanswered pings, oldest first: {at, seq}
let lastPing = 0;

// The session's record, written when the outbox or the pairing changes; the n of the last
// message shown has a key of its own, written at each message (a number, not the outbox).
function remember() {
  try {
    if (!session.token) {
      sessionStorage.removeItem(STORE);
      sessionStorage.removeItem(STORE + ".n");
      return;
    }
    sessionStorage.setItem(STORE + ".n", String(session.lastN));
    sessionStorage.setItem(STORE, JSON.stringify({
      token: session.token,
      nick: window.chat.nick, peer: window.chat.peer, paired: window.chat.paired,
      outbox: outbox.filter((entry) => entry.number !== null)
                    .map((entry) => ({ number: entry.number, message: entry.message,
                                       transmitted: entry.transmitted })),
    }));
  } catch (error) {
    // Storage full or forbidden: the session still works in this page, only a reload loses it.
  }
}

function rememberShown() {
  try {
    sessionStorage.setItem(STORE + ".n", String(session.lastN));
  } catch (error) {
    // as in remember()
  }
}

function recall() {
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(STORE)); } catch (error) { saved = null; }
  if (!saved || typeof saved.token !== "string") return;
  session.token = saved.token;
  session.asked = true;
  session.lastN = session.ackedN = Number(sessionStorage.getItem(STORE + ".n")) || 0;
  // Shown until chatd says otherwise (resumed), and taken again should it not know the session.
  window.chat.nick = saved.nick || null;
  window.chat.peer = saved.peer || null;
  window.chat.paired = saved.paired || null;
  if (window.chat.nick) $("nick").value = window.chat.nick;
  if (window.chat.peer) $("peer").value = window.chat.peer;
  for (const kept of Array.isArray(saved.outbox) ? saved.outbox : []) {
    if (!kept || typeof kept.message !== "object" || !Number.isInteger(kept.number)) continue;
    const entry = { seq: ++sequence, number: kept.number, message: kept.message, item: null,
                    transmitted: kept.transmitted !== false };
    if (kept.message.type === "msg") entry.item = showOut(kept.message.text);
    outbox.push(entry);
    session.numbered = Math.max(session.numbered, kept.number);
  }
  countPending();
}

function forget() {
  clearTimeout(session.ackTimer);
  Object.assign(session, { token: null, asked: false, numbered: 0, lastN: 0, ackedN: 0, unacked: 0 });
  remember();
  window.chat.session = false;
}

// -- what the page shows -------------------------------------------------------------------
function setState(state, status, action) {
  window.chat.state = state;
  const labels = { lost: "reconnecting…", waiting: "waiting for the server" };
  $("state").textContent = labels[state] || state;
  $("state").className = "badge " + state;
  document.body.dataset.state = state;
  $("promise").textContent = (session.token && SESSION_FOOTERS[state]) || FOOTERS[state];
  $("status-text").textContent = status || "";
  $("status").hidden = !status;
  $("status-action").hidden = !action;
  if (action) $("status-action").textContent = action;
  showPairing();
}

function note(text, kind) {
  const item = document.createElement("li");
  item.className = kind || "note";
  item.textContent = text;
  $("log").appendChild(item);
  item.scrollIntoView({ block: "end" });
}

function showOut(text) {
  const item = document.createElement("li");
  item.className = "out pending";
  item.textContent = text;
  $("log").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showPairing() {
  const paired = window.chat.paired;
  const connected = ["open", "waiting"].includes(window.chat.state);
  // With a session, the pairing outlives the connection: typing goes on, and is sent on resume.
  const kept = Boolean(session.token) && ["lost", "offline"].includes(window.chat.state);
  $("pairing").textContent = paired ? "paired with " + paired : !connected ? "not paired (not connected)" :
    "not paired" + (window.chat.peer ? " (waiting for " + window.chat.peer + " to pair with you)" : "");
  $("pairing").className = paired ? "pairing paired" : "pairing";
  $("text").disabled = $("send").disabled = !((connected || kept) && paired);
}

// -- sending -------------------------------------------------------------------------------
function transmit(message) {
  if (link.socket && link.socket.readyState === WebSocket.OPEN) link.socket.send(JSON.stringify(message));
}

// A chat command (nick, pair, msg, who, ping, quit): numbered once a session is asked for,
// kept until handled (pings are not kept: they are only questions), sent now if it can be.
function send(message, item) {
  const seq = ++sequence;
  const number = session.asked ? ++session.numbered : null;
  const entry = { seq, number, message, item: item || null, transmitted: false };
  // Kept if it is to be sent later (a session's), or to be confirmed (sent now); pings never.
  if (message.type !== "ping" && (number !== null || link.phase === "open")) {
    outbox.push(entry);
    if (number !== null) remember();
  }
  if (link.phase === "open") {
    transmit(message);
    entry.transmitted = true;
    if (message.type !== "ping") activity();
  }
  window.chat.sent = session.numbered;
  countPending();
  return seq;
}

function ping() {
  lastPing = Date.now();
  pings.push({ at: lastPing, seq: send({ type: "ping" }) });
}

function countPending() {
  window.chat.pending = outbox.filter((entry) => entry.item && entry.item.classList.contains("pending")).length;
  window.chat.kept = outbox.length;
}

// Everything up to here is handled: confirmed, not kept.
function handledUpTo(test) {
  const done = outbox.filter(test);
  if (done.length === 0) return;
  done.forEach((entry) => entry.item && entry.item.classList.remove("pending"));
  outbox = outbox.filter((entry) => !test(entry));
  countPending();
  remember();
}

// -- is chatd answering? ------------------------------------------------------------------
function answered() {
  const entry = pings.shift();
  if (entry) {
    // Handled by the host that answered: shown so. But a command the session numbered is kept
    // until a handled count covers it: in a cluster another host may take the session over from
    // its last count, and this page then sends again what that count does not cover.
    const before = (kept) => kept.seq < entry.seq;
    outbox.filter(before).forEach((kept) => kept.item && kept.item.classList.remove("pending"));
    handledUpTo((kept) => before(kept) && kept.number === null);
    countPending();
  }
  if (window.chat.state === "waiting" && !late(ANSWER)) setState("open");
}

function late(limit) {
  if (link.phase === "resuming") return Date.now() - link.resumeAt >= limit;
  return pings.length > 0 && Date.now() - pings[0].at >= limit;
}

// Unanswered that long, and nothing at all heard for as long: a pong may wait long behind a
// flood held back by a slow reader, but messages still come then.
function dead() {
  return late(DEAD) && Date.now() - link.heardAt >= DEAD;
}

function watch() {
  const socket = link.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN || link.phase === "ended") return;
  if (session.token && dead()) {
    abandon("nothing came back for " + DEAD / 1000 + " s", true);
  } else if (link.phase !== "open" || !["open", "waiting"].includes(window.chat.state)) {
    return;
  } else if (window.chat.state === "open" && late(ANSWER)) {
    setState("waiting", "The server is not answering. Messages you type are kept and delivered when it is back.");
  } else if (pings.length === 0 && Date.now() - lastPing >= HEARTBEAT) {
    ping();
  }
}
setInterval(watch, Math.min(250, ANSWER / 4));

// -- acknowledging what was shown ----------------------------------------------------------
// Something was shown or sent: an ack after ACK_EVERY of them, or once things are quiet
// (so chatd forgets what was shown, and the page what chatd handled).
function activity() {
  clearTimeout(session.ackTimer);
  if (!session.token) return;
  session.unacked += 1;
  if (session.unacked >= ACK_EVERY) ack(); else session.ackTimer = setTimeout(ack, ACK_IDLE);
}

function ack() {
  clearTimeout(session.ackTimer);
  if (!session.token || link.phase !== "open") return;
  if (session.lastN === session.ackedN && !outbox.some((entry) => entry.number !== null && entry.transmitted)) return;
  transmit({ type: "ack", n: session.lastN });
  session.ackedN = session.lastN;
  session.unacked = 0;
}

// -- the server's messages ---------------------------------------------------------------
function handle(message) {
  switch (message.type) {
    case "from": {
      if (session.token && message.n <= session.lastN) {
        window.chat.dropped += 1;   // shown already: chatd sends each once, this is a guard
        break;
      }
      session.lastN = window.chat.lastN = message.n;
      window.chat.messages.push({ from: message.from, n: message.n, text: message.text });
      const item = document.createElement("li");
      item.className = "in";
      const number = document.createElement("span");
      number.className = "n";
      number.textContent = "#" + message.n;
      item.append(number, message.text);
      $("log").appendChild(item);
      item.scrollIntoView({ block: "end" });
      if (session.token) {
        rememberShown();
        activity();
      }
      break;
    }
    case "ok":
      if (message.command === "nick") {
        window.chat.nick = message.name;
        note("you are " + message.name);
        if (!session.asked && !session.off) askForSession();
      }
      if (message.command === "pair") { window.chat.peer = message.name; }
      showPairing();
      remember();
      break;
    case "paired":
      if (!session.token) session.lastN = 0;   // without a session, n starts again with a pairing
      window.chat.paired = message.peer;
      note("paired with " + message.peer);
      showPairing();
      remember();
      break;
    case "unpaired":
      window.chat.paired = null;
      note(message.peer + " left the pairing");
      showPairing();
      remember();
      break;
    case "users":
      note("online: " + message.users.map((u) => u.nick + (u.peer ? " ↔ " + u.peer : "")).join(", "));
      break;
    case "pong":
      answered();
      break;
    case "session":
      session.token = message.token;
      window.chat.session = true;
      remember();
      break;
    case "resumed":
      resumed(message);
      break;
    case "handled":
      handledUpTo((entry) => entry.transmitted && entry.number !== null && entry.number <= message.count);
      break;
    case "bye":
      link.phase = "ended";
      note("the server said goodbye: the chat ended");
      break;
    case "error":
      if (message.code === "sessions-off") {
        sessionsOff();
      } else if (message.code === "unknown-session" || message.code === "no-session") {
        newClient("The server no longer has this chat (" + message.code + ")");
      } else if (message.code === "busy" && link.phase === "resuming") {
        window.chat.busy += 1;
        link.floor = 1000 * (Number(message.retry_after) || 0);
        abandon("the server is busy", false);
      } else {
        window.chat.errors.push(message.code);
        note("error: " + message.code, "error");
      }
      break;
  }
}

function askForSession() {
  session.asked = true;
  session.numbered = 0;
  transmit({ type: "session" });
}

// chatd keeps no sessions here (across hosts, so far): what was numbered is not counted.
function sessionsOff() {
  session.off = true;
  session.asked = false;
  session.numbered = 0;
  outbox.forEach((entry) => { entry.number = null; });
  note("this server keeps no sessions: a connection lost is a new client");
}

// Taken back: chatd handled our commands up to `handled`; what is kept after that is sent
// again, numbered on from there (pings are left out: chatd counts what it gets, in order).
function resumed(message) {
  link.phase = "open";
  window.chat.attempts = 0;
  window.chat.resumes += 1;
  const before = window.chat.paired;
  window.chat.nick = message.nick;
  window.chat.peer = message.peer;
  window.chat.paired = message.peer;
  if (before && !message.peer) note(before + " left the pairing");
  if (message.nick) $("nick").value = message.nick;
  if (message.peer) $("peer").value = message.peer;
  const handled = Number(message.handled) || 0;
  // Sent before the session began: chatd did not count it, so whether it was handled is unknown.
  const unknown = outbox.filter((entry) => entry.number === null);
  unknown.forEach((entry) => entry.item && entry.item.classList.replace("pending", "lost"));
  outbox = outbox.filter((entry) => entry.number !== null);
  const done = (entry) => entry.transmitted && entry.number <= handled;
  const again = outbox.filter((entry) => !done(entry));
  handledUpTo(done);
  session.numbered = handled;
  for (const entry of again) {
    entry.number = ++session.numbered;
    transmit(entry.message);
    entry.transmitted = true;
  }
  window.chat.sent = session.numbered;
  countPending();
  remember();
  setState("open");
  ping();
  activity();
}

// chatd does not know this session: this connection goes on as a new client.
function newClient(why) {
  const unconfirmed = outbox.filter((entry) => entry.item);
  unconfirmed.forEach((entry) => { entry.item.classList.remove("pending"); entry.item.classList.add("lost"); });
  outbox = [];
  pings = [];
  forget();
  countPending();
  window.chat.fallbacks += 1;
  window.chat.paired = null;
  note(why + ": connected again, as a new client" + (unconfirmed.length ? "; " + unconfirmed.length +
       " message(s) you sent were not confirmed and may not have arrived" : ""), "error");
  link.phase = "open";
  window.chat.attempts = 0;
  setState("open");
  greet();
}

// A new client names itself and pairs again (the name's ok asks for a session).
function greet() {
  if (window.chat.nick) transmit({ type: "nick", name: window.chat.nick });
  if (window.chat.peer) transmit({ type: "pair", peer: window.chat.peer });
  ping();
}

// -- connecting, losing, ending --------------------------------------------------------------
function connect() {
  clearTimeout(link.retryTimer);
  link.phase = "closed";
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const current = link.socket = new WebSocket(scheme + location.host + "/ws");
  if (window.chat.attempts === 0) {
    setState("connecting");
  } else {
    setState("lost", "No connection to the server. Connecting (try " + window.chat.attempts + " of " +
             RETRIES + ")…");
  }
  current.onopen = () => {
    link.heardAt = Date.now();
    window.chat.opens += 1;
    pings = [];
    if (session.token) {
      link.phase = "resuming";
      link.resumeAt = Date.now();
      transmit({ type: "resume", token: session.token, n: session.lastN });
      return;
    }
    if (window.chat.opens > 1) note("connected again, as a new client");
    link.phase = "open";
    window.chat.attempts = 0;
    setState("open");
    greet();
  };
  current.onmessage = (event) => {
    link.heardAt = Date.now();
    handle(JSON.parse(event.data));
  };
  current.onclose = () => lost(current);
}

// The socket is gone (closed, or given up): what was on its way is resent on resume with a
// session, and marked not confirmed without one.
function lost(current) {
  if (current !== link.socket) return;
  link.socket = null;
  window.chat.closes += 1;
  const wasOpen = link.phase === "open" || link.phase === "resuming";
  const ended = link.phase === "ended";
  link.phase = "closed";
  pings = [];
  if (ended) {
    outbox = [];
    forget();
    countPending();
    window.chat.paired = null;
    setState("ended", "The server ended this chat.", "Start again");
    return;
  }
  if (!session.token) {
    window.chat.paired = null;
    const unconfirmed = outbox.filter((entry) => entry.item);
    unconfirmed.forEach((entry) => { entry.item.classList.remove("pending"); entry.item.classList.add("lost"); });
    outbox = [];
    session.asked = false;   // asked, never answered: the next connection asks again
    countPending();
    if (wasOpen) {
      note("connection lost" + (unconfirmed.length ? ": " + unconfirmed.length +
           " message(s) you sent were not confirmed and may not have arrived" : ""), "error");
    }
  }
  retry();
}

// Give a socket up without waiting for its close (a half-open one may never close). A socket
// that holds the session is not closed from here: its close frame, should it reach chatd
// after all (chatd was only slow), would end the session; the resume on the next socket
// closes it instead. One that does not hold it (a resume refused as busy) is closed.
function abandon(why, holdsSession) {
  const current = link.socket;
  window.chat.abandoned += 1;
  window.chat.lastAbandon = why;
  current.onopen = current.onmessage = current.onclose = null;
  if (!holdsSession) current.close();
  lost(current);
}

function retry() {
  if (window.chat.attempts >= RETRIES) {
    const kept = session.token ? " What you typed is kept: reconnecting sends it, if the server still has this chat."
                               : " Messages in flight are lost.";
    setState("offline", "Could not reach the server (" + RETRIES + " tries)." + kept, "Reconnect");
    return;
  }
  // Full jitter: anywhere up to the capped exponential, so that many pages cut off at
  // once do not all come back at the same instant; never sooner than chatd asked.
  const delay = Math.max(link.floor, Math.random() * Math.min(BACKOFF_CAP, BACKOFF * 2 ** window.chat.attempts));
  link.floor = 0;
  window.chat.attempts += 1;
  setState("lost", "No connection to the server. Trying again in " + (delay / 1000).toFixed(1) + " s (try " +
           window.chat.attempts + " of " + RETRIES + ")." +
           (session.token ? " What you type is sent when the connection is back." : ""));
  link.retryTimer = setTimeout(connect, delay);
}

// -- the user --------------------------------------------------------------------------------
$("status-action").addEventListener("click", () => {
  window.chat.attempts = 0;
  connect();
});
$("nick-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send({ type: "nick", name: $("nick").value.trim() });
});
$("pair-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send({ type: "pair", peer: $("peer").value.trim() });
});
$("msg-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text || $("text").disabled) return;
  send({ type: "msg", text: text }, showOut(text));
  $("text").value = "";
  if (link.phase === "open") ping();
});
// Leaving (a reload, another page): what arrives from now on is not shown, so it is not
// counted as shown either; the next page of this tab resumes from the last one shown.
addEventListener("pagehide", () => {
  if (link.socket) link.socket.onmessage = link.socket.onclose = null;
  clearTimeout(link.retryTimer);
  remember();
});
addEventListener("pageshow", (event) => {
  if (event.persisted) connect();  // back from the back-forward cache: a new socket, the session resumed
});
recall();
window.chat.session = Boolean(session.token);
window.chat.lastN = session.lastN;
connect();
