// The chat page: one WebSocket to chatd (/ws), JSON messages both ways (see README,
// "The web chat"). The socket is kept across a crash of chatd, so the page never has to
// reconnect or reload; if the socket does close (the server drained it, the network went),
// the page says so and reconnects. window.chat is what it has seen, for tests to read.
"use strict";

const $ = (id) => document.getElementById(id);
window.chat = { opens: 0, closes: 0, messages: [], errors: [], nick: null, peer: null, paired: null };
let socket = null;
let retry = 500;

function setState(state) {
  $("state").textContent = state;
  $("state").className = "badge " + state;
  const usable = state === "open" && window.chat.paired;
  $("text").disabled = !usable;
  $("send").disabled = !usable;
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
  $("pairing").textContent = paired ? "paired with " + paired : "not paired" +
    (window.chat.peer ? " (waiting for " + window.chat.peer + " to pair with you)" : "");
  $("pairing").className = paired ? "pairing paired" : "pairing";
  setState(socket && socket.readyState === WebSocket.OPEN ? "open" : $("state").textContent);
}

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
    case "bye":
      note("the server said goodbye");
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

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  socket = new WebSocket(scheme + location.host + "/ws");
  setState("connecting");
  socket.onopen = () => {
    window.chat.opens += 1;
    retry = 500;
    setState("open");
    if (window.chat.nick) send({ type: "nick", name: window.chat.nick });
    if (window.chat.peer) send({ type: "pair", peer: window.chat.peer });
  };
  socket.onmessage = (event) => handle(JSON.parse(event.data));
  socket.onclose = () => {
    window.chat.closes += 1;
    window.chat.paired = null;
    setState("closed");
    showPairing();
    note("connection closed; reconnecting", "error");
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 8000);
  };
}

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
  item.className = "out";
  item.textContent = text;
  $("log").appendChild(item);
  item.scrollIntoView({ block: "end" });
  $("text").value = "";
});
connect();
