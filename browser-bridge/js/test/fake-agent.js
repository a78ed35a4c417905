// A stand-in for the agent's side of the WebSocket, for node --test. `FakeAgent#WebSocket` is a
// class with the browser WebSocket's shape (onopen/onmessage/onclose/onerror, send, close,
// readyState); the test reads what the client sent with `await agent.nextRequest()` and answers
// with `socket.reply(message)`. Events are delivered asynchronously, as a browser does.

import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const FIXTURES = fileURLToPath(new URL('../../fixtures/', import.meta.url));

/** The parsed fixture `name` (e.g. 'sign.digest.request.json'). */
export function fixture(name) {
  return JSON.parse(readFileSync(FIXTURES + name, 'utf8'));
}

/** Fixture file names in the top folder matching `re`. */
export function fixtureNames(re) {
  return readdirSync(FIXTURES).filter((n) => re.test(n)).sort();
}

const later = (fn) => setImmediate(fn);

export class FakeAgent {
  /** 'accept' opens sockets; 'refuse' fails them like a closed port; 'hang' never answers. */
  mode = 'accept';
  /** Every socket the client created, in order. */
  sockets = [];
  /** Optional `(socket, count)` hook, called as each socket is created (before `mode` is read). */
  onSocket = null;
  #requests = [];
  #waiters = [];

  constructor() {
    const agent = this;
    this.WebSocket = class FakeWebSocket {
      static OPEN = 1;
      readyState = 0;
      onopen = null;
      onmessage = null;
      onclose = null;
      onerror = null;

      constructor(url) {
        this.url = url;
        agent.sockets.push(this);
        agent.onSocket?.(this, agent.sockets.length);
        this.mode = agent.mode;
        later(() => {
          if (this.readyState !== 0) return;
          if (this.mode === 'accept') {
            this.readyState = 1;
            this.onopen?.({ type: 'open' });
          } else if (this.mode === 'refuse') {
            this.readyState = 3;
            this.onerror?.({ type: 'error' });
            this.onclose?.({ type: 'close', code: 1006, reason: '', wasClean: false });
          }
        });
      }

      send(text) {
        if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
        agent.#push({ message: JSON.parse(text), socket: this });
      }

      close(code = 1000, reason = '') {
        if (this.readyState >= 2) return;
        this.readyState = 3;
        later(() => this.onclose?.({ type: 'close', code, reason, wasClean: true }));
      }

      // ---- the agent's side ----
      reply(message) {
        later(() => this.onmessage?.({ data: JSON.stringify(message) }));
      }

      /** The agent goes away (crash, restart): close 1006 without a handshake. */
      drop(code = 1006) {
        this.readyState = 3;
        later(() => this.onclose?.({ type: 'close', code, reason: '', wasClean: false }));
      }
    };
  }

  /** The next message any socket sent: `{message, socket}`. */
  nextRequest() {
    if (this.#requests.length) return Promise.resolve(this.#requests.shift());
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  #push(entry) {
    const waiter = this.#waiters.shift();
    if (waiter) waiter(entry);
    else this.#requests.push(entry);
  }
}

/** Resolves when `client` next reaches `state`. */
export function stateReached(client, state) {
  return new Promise((resolve) => {
    const off = client.onStateChange((s, detail) => {
      if (s === state) {
        off();
        resolve(detail);
      }
    });
  });
}

