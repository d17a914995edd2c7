// The chat page: one WebSocket to chatd (/ws), JSON messages both ways (see README,
// "The web chat"). What the page shows must be true, so it tells four cases apart:
//
// - open: chatd answers. The socket is kept across a crash of chatd, so a crash by
//   itself never closes it: nothing to reload, nothing lost.
// - waiting: the socket is open but chatd does not answer (dead, stopped, restoring).
//   The page sends {"type":"ping"} after each message and every HEARTBEAT ms while
//   idle; chatd answers {"type":"pong"} once it has handled everything sent before
//   (commands are handled in order). A ping unanswered for `answer_ms` means
//   waiting: what the user types waits in the kernel's buffers and is handled when
//   chatd is back, and the page marks those messages as waiting until their pong.
// - lost: the socket closed without a goodbye (holderd and chatd both gone, the
//   network). The page reconnects with capped, fully jittered exponential backoff,
//   in one status line updated in place, and gives up after `retries` tries with a
//   button to try again. A new socket is a new client: it takes the name and the
//   pairing again, but what was in flight on the old one is lost, and the page says so.
// - ended: the server said goodbye ({"type":"bye"}: a QUIT, or `chatctl drain`).
//   The page does not reconnect: the user starts again with a button.
//
// The timings come from the page's query string (for tests): retries, backoff_ms,
// backoff_cap_ms, answer_ms. window.chat is what the page has seen, for tests to read.
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
const HEARTBEAT = 10000;                          // an idle page pings this often

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

window.chat = { opens: 0, closes: 0, messages: [], errors: [], nick: null, peer: null, paired: null,
                state: "connecting", attempts: 0, pending: 0 };
let socket = null;
let ended = false;        // the server said goodbye on this socket
let retryTimer = null;
let pings = [];           // unanswered pings, oldest first: {at, items: the messages it confirms}
let lastPing = 0;

function setState(state, status, action) {
  window.chat.state = state;
  const labels = { lost: "reconnecting", waiting: "waiting for the server" };
  $("state").textContent = labels[state] || state;
  $("state").className = "badge " + state;
  document.body.dataset.state = state;
  $("promise").textContent = FOOTERS[state];
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

function showPairing() {
  const paired = window.chat.paired;
  const connected = ["open", "waiting"].includes(window.chat.state);
  $("pairing").textContent = paired ? "paired with " + paired : !connected ? "not paired (not connected)" :
    "not paired" + (window.chat.peer ? " (waiting for " + window.chat.peer + " to pair with you)" : "");
  $("pairing").className = paired ? "pairing paired" : "pairing";
  $("text").disabled = $("send").disabled = !(connected && paired);
}

// -- is chatd answering? ------------------------------------------------------------------
function ping(items) {
  lastPing = Date.now();
  pings.push({ at: lastPing, items: items });
  countPending();
  send({ type: "ping" });
}

function countPending() {
  window.chat.pending = pings.reduce((count, entry) => count + entry.items.length, 0);
}

function answered() {
  const entry = pings.shift();
  if (entry) entry.items.forEach((item) => item.classList.remove("pending"));
  countPending();
  if (window.chat.state === "waiting" && !late()) setState("open");
}

function late() {
  return pings.length > 0 && Date.now() - pings[0].at >= ANSWER;
}

function watch() {
  if (!socket || socket.readyState !== WebSocket.OPEN || ended || window.chat.state !== "open") return;
  if (late()) {
    setState("waiting", "The server is not answering. Messages you type are kept and delivered when it is back.");
  } else if (pings.length === 0 && Date.now() - lastPing >= HEARTBEAT) {
    ping([]);
  }
}
setInterval(watch, Math.min(250, ANSWER / 4));

// -- the server's messages ---------------------------------------------------------------
function handle(message) {
  switch (message.type) {
    case "from": {
      window.chat.messages.push({ from: message.from, n: message.n, text: message.text });
      const item = document.createElement("li");
      item.className = "in";
      const number = document.createElement("span");
      number.className = "n";
      number.textContent = "#" + message.n;
      item.append(number, message.text);
      $("log").appendChild(item);
      item.scrollIntoView({ block: "end" });
      break;
    }
    case "ok":
      if (message.command === "nick") { window.chat.nick = message.name; note("you are " + message.name); }
      if (message.command === "pair") { window.chat.peer = message.name; }
      showPairing();
      break;
    case "paired":
      window.chat.paired = message.peer;
      note("paired with " + message.peer);
      showPairing();
      break;
    case "unpaired":
      window.chat.paired = null;
      note(message.peer + " left the pairing");
      showPairing();
      break;
    case "users":
      note("online: " + message.users.map((u) => u.nick + (u.peer ? " ↔ " + u.peer : "")).join(", "));
      break;
    case "pong":
      answered();
      break;
    case "bye":
      ended = true;
      note("the server said goodbye: the chat ended");
      break;
    case "error":
      window.chat.errors.push(message.code);
      note("error: " + message.code, "error");
      break;
  }
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

// -- connecting, losing, ending --------------------------------------------------------------
function connect() {
  clearTimeout(retryTimer);
  ended = false;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const current = socket = new WebSocket(scheme + location.host + "/ws");
  let opened = false;
  if (window.chat.attempts === 0) {
    setState("connecting");
  } else {
    setState("lost", "No connection to the server. Connecting (try " + window.chat.attempts + " of " +
             RETRIES + ")…");
  }
  current.onopen = () => {
    opened = true;
    if (window.chat.opens > 0) note("connected again, as a new client");
    window.chat.opens += 1;
    window.chat.attempts = 0;
    setState("open");
    if (window.chat.nick) send({ type: "nick", name: window.chat.nick });
    if (window.chat.peer) send({ type: "pair", peer: window.chat.peer });
    ping([]);
  };
  current.onmessage = (event) => handle(JSON.parse(event.data));
  current.onclose = () => {
    window.chat.closes += 1;
    window.chat.paired = null;
    const unconfirmed = pings.flatMap((entry) => entry.items);
    unconfirmed.forEach((item) => { item.classList.remove("pending"); item.classList.add("lost"); });
    pings = [];
    countPending();
    if (ended) {
      setState("ended", "The server ended this chat.", "Start again");
    } else {
      if (opened) {
        note("connection lost" + (unconfirmed.length ? ": " + unconfirmed.length +
             " message(s) you sent were not confirmed and may not have arrived" : ""), "error");
      }
      retry();
    }
  };
}

function retry() {
  if (window.chat.attempts >= RETRIES) {
    setState("offline", "Could not reach the server (" + RETRIES + " tries). Messages in flight are lost.",
             "Reconnect");
    return;
  }
  window.chat.attempts += 1;
  // Full jitter: anywhere up to the capped exponential, so that many pages cut off at
  // once do not all come back at the same instant.
  const delay = Math.random() * Math.min(BACKOFF_CAP, BACKOFF * 2 ** (window.chat.attempts - 1));
  setState("lost", "No connection to the server. Trying again in " + (delay / 1000).toFixed(1) + " s (try " +
           window.chat.attempts + " of " + RETRIES + ").");
  retryTimer = setTimeout(connect, delay);
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
  if (!text) return;
  send({ type: "msg", text: text });
  const item = document.createElement("li");
  item.className = "out pending";
  item.textContent = text;
  $("log").appendChild(item);
  item.scrollIntoView({ block: "end" });
  $("text").value = "";
  ping([item]);
});
connect();
