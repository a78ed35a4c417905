// KeyPort browser client, protocol v1 (see docs/protocol.md in the KeyPort repository).
//
// One `KeyPort` object holds one WebSocket to the local agent. Requests are JSON-RPC 2.0 with
// ids counting up from 1 for the life of the object; answers are matched by id; events
// (`tokens.changed`, `sign.progress`) are routed to subscribers. When the socket drops, every
// pending call fails with CONNECTION_LOST and the client reconnects with backoff, re-sending
// nothing. Plain ES2022, no dependencies; types are in keyport.d.ts.

/** Where the agent listens unless told otherwise. */
export const DEFAULT_URL = 'ws://127.0.0.1:47333/v1';

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/**
 * WebSocket close codes the agent sends (docs/protocol.md). 1000 closes an idle connection
 * of an origin not approved: the client does not reconnect then, the next call opens again.
 */
export const CloseCode = Object.freeze({
  IDLE: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  INVALID_UTF8: 1007,
  MESSAGE_TOO_BIG: 1009,
});

/** Wire error codes of docs/protocol.md, by code, used when an error arrives without `data.reason`. */
const REASON_BY_CODE = Object.freeze({
  [-32700]: 'PARSE_ERROR',
  [-32600]: 'INVALID_REQUEST',
  [-32601]: 'METHOD_NOT_FOUND',
  [-32602]: 'INVALID_PARAMS',
  1000: 'ORIGIN_NOT_APPROVED',
  1001: 'ORIGIN_DENIED',
  1002: 'USER_CANCELLED',
  1003: 'PIN_INCORRECT',
  1004: 'PIN_LOCKED',
  1005: 'TOKEN_NOT_PRESENT',
  1006: 'CERTIFICATE_NOT_FOUND',
  1007: 'KEY_USAGE_NOT_ALLOWED',
  1008: 'ALGORITHM_NOT_SUPPORTED',
  1009: 'BUSY',
  1010: 'TIMEOUT',
  1011: 'RATE_LIMITED',
  1012: 'PIN_FROM_PAGE_REFUSED',
  1013: 'TOKEN_ERROR',
  1014: 'INTERNAL',
});

/**
 * Every reason a KeyPortError can carry: the agent's (docs/protocol.md) and the client's own.
 * The client's own have `code === null`.
 */
export const Reason = Object.freeze({
  ...Object.fromEntries(Object.values(REASON_BY_CODE).map((r) => [r, r])),
  AGENT_NOT_RUNNING: 'AGENT_NOT_RUNNING',
  LOOPBACK_BLOCKED: 'LOOPBACK_BLOCKED',
  CONNECTION_LOST: 'CONNECTION_LOST',
  ABORTED: 'ABORTED',
  CLOSED: 'CLOSED',
  BAD_RESPONSE: 'BAD_RESPONSE',
});

/** An error the page can act on: match on `reason`, never on `message`. */
export class KeyPortError extends Error {
  /**
   * @param {string} reason
   * @param {string} message
   * @param {{code?: number|null, data?: object, cause?: unknown}} [options]
   */
  constructor(reason, message, { code = null, data = {}, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'KeyPortError';
    this.reason = reason;
    this.code = code;
    this.data = { ...data, reason };
  }
}

const OPEN = 1; // WebSocket.OPEN, the same number in every implementation

/** The client. Create it with `await KeyPort.connect(options)`. */
export class KeyPort {
  #url;
  #WebSocket;
  #timeoutMs;
  #globals;
  #backoff;
  #ws = null;
  #state = 'closed';
  #closedByUser = false;
  #opening = null;
  #reconnectTimer = null;
  #attempt = 0;
  #nextId = 1;
  /** @type {Map<number, {resolve: Function, reject: Function, onProgress?: Function, method: string}>} */
  #pending = new Map();
  #tokenListeners = new Set();
  #stateListeners = new Set();

  /**
   * Opens the connection; rejects with AGENT_NOT_RUNNING or LOOPBACK_BLOCKED when it cannot.
   * @param {import('./keyport.d.ts').ConnectOptions} [options]
   * @returns {Promise<KeyPort>}
   */
  static async connect(options = {}) {
    const client = new KeyPort(options);
    try {
      await client.#open();
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** Use `KeyPort.connect`; the constructor does not connect. */
  constructor({
    url = DEFAULT_URL,
    WebSocket = globalThis.WebSocket,
    timeoutMs = 15000,
    reconnect = {},
    globals = globalThis,
  } = {}) {
    if (typeof WebSocket !== 'function') {
      throw new TypeError('KeyPort: no WebSocket class; pass one as the `WebSocket` option');
    }
    this.#url = url;
    this.#WebSocket = WebSocket;
    this.#timeoutMs = timeoutMs;
    this.#globals = globals;
    this.#backoff =
      reconnect === false
        ? null
        : { initialDelayMs: 500, maxDelayMs: 15000, factor: 2, ...reconnect };
  }

  /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this.#state;
  }

  get url() {
    return this.#url;
  }

  // ---- the protocol's methods -------------------------------------------------------------

  /** `hello`: the agent's name, version, the page's origin as the agent sees it, approval. */
  hello(client, options) {
    return this.#call('hello', client ? { client } : {}, options);
  }

  /** `origin.requestAccess`: asks the user to allow this origin. */
  requestAccess(options) {
    return this.#call('origin.requestAccess', {}, options);
  }

  /** `tokens.list` → the array of tokens. */
  listTokens(options) {
    return this.#call('tokens.list', {}, options, (r) => requireArray(r, 'tokens'));
  }

  /** `certificates.list` → the array of certificates, `certificate` decoded to bytes. */
  listCertificates(filter, options) {
    return this.#call('certificates.list', filter ? { filter } : {}, options, (r) =>
      requireArray(r, 'certificates').map((c) => withBytes(c, 'certificate')),
    );
  }

  /** `sign` → `{signature, signatureBase64, certificate, certificateBase64, ...}`. */
  sign(request) {
    const { signal, timeoutMs, ...rest } = request ?? {};
    return this.#call('sign', () => signParams(rest, false), { signal, timeoutMs }, decodeSignResult);
  }

  /** `sign.batch` → the array of results in item order; `onProgress({done, total})` meanwhile. */
  signBatch(request) {
    const { signal, timeoutMs, onProgress, ...rest } = request ?? {};
    return this.#call(
      'sign.batch',
      () => signParams(rest, true),
      { signal, timeoutMs, onProgress },
      (r) => requireArray(r, 'results').map(decodeSignResult),
    );
  }

  /** `authenticate` → the Web eID authentication token, unchanged: send it to your server as is. */
  authenticate({ challenge, certificateId, algorithm, signal, timeoutMs } = {}) {
    // The nonce string goes as received: the signature covers its exact characters.
    const params = () => ({
      challenge: typeof challenge === 'string' ? challenge : toBase64(challenge, 'challenge'),
      certificateId,
      algorithm,
    });
    return this.#call('authenticate', params, { signal, timeoutMs });
  }

  /**
   * `keys.generate` → `{keyId, csr, csrBase64}`: a key pair made on the token and its PKCS#10
   * request (DER), signed by the new key. `keyId` is the `certificateId` its certificate gets.
   * `algorithm` 'SM2' makes an SM2 key in an SKF key's container named `label` (SM3withSM2
   * request, default user ID); the other types are for PKCS#11 tokens.
   */
  generateKey({ tokenId, algorithm, label, subject, alwaysAuthenticate, signal, timeoutMs } = {}) {
    return this.#call(
      'keys.generate',
      { tokenId, algorithm, label, subject, alwaysAuthenticate },
      { signal, timeoutMs },
      (r) => withBytes(r, 'csr'),
    );
  }

  /**
   * `certificates.import` → `{certificateId}`. A renewal for a key that has a certificate is
   * stored beside it (both listed; the answer is the new one's own id) unless `replace: true`,
   * which deletes the old one once the new one is stored.
   */
  importCertificate({ tokenId, certificate, replace, signal, timeoutMs } = {}) {
    return this.#call(
      'certificates.import',
      () => ({ tokenId, certificate: toBase64(certificate, 'certificate'), replace }),
      { signal, timeoutMs },
    );
  }

  /** `cancel`: cancels a pending request of this connection by its id (`promise.requestId`). */
  cancel(requestId, options) {
    return this.#call('cancel', { requestId }, options);
  }

  // ---- events and lifetime ----------------------------------------------------------------

  /** Calls `callback(tokens, params)` on every `tokens.changed`; returns the unsubscribe function. */
  onTokensChanged(callback) {
    this.#tokenListeners.add(callback);
    return () => this.#tokenListeners.delete(callback);
  }

  /** Calls `callback(state, detail)` when the connection state changes; returns unsubscribe. */
  onStateChange(callback) {
    this.#stateListeners.add(callback);
    return () => this.#stateListeners.delete(callback);
  }

  /** Closes for good: pending calls fail with CLOSED, no reconnect. */
  close() {
    this.#closedByUser = true;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#failPending(Reason.CLOSED, 'the client was closed', {});
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        // already closing; nothing to do
      }
    }
    this.#setState('closed');
  }

  // ---- internals --------------------------------------------------------------------------

  /**
   * Sends one request and settles with its decoded result. The id is taken at once and put on
   * the returned promise as `requestId` (for `cancel`). `params` may be a function building
   * them, so that bad input rejects the promise rather than throwing.
   */
  #call(method, params, { signal, timeoutMs, onProgress } = {}, decode = (r) => r) {
    const id = this.#nextId++;
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.requestId = id;

    let finished = false;
    let timer = null;
    const finish = () => {
      finished = true;
      if (this.#pending.get(id)?.owner === promise) this.#pending.delete(id);
      signal?.removeEventListener?.('abort', onAbort);
      clearTimeout(timer);
    };
    const fail = (err) => {
      if (finished) return;
      finish();
      reject(err);
    };
    const succeed = (result) => {
      if (finished) return;
      finish();
      try {
        resolve(decode(result));
      } catch (err) {
        reject(
          err instanceof KeyPortError
            ? err
            : new KeyPortError(Reason.BAD_RESPONSE, `bad ${method} result: ${err}`, { cause: err }),
        );
      }
    };
    // Giving up early (abort or timeout) tells the agent, best effort, so its dialog closes,
    // and fails at once, as fetch() does; the agent's later USER_CANCELLED is dropped.
    const giveUp = (message, data, cause) => {
      if (finished) return;
      const sent = this.#pending.get(id)?.owner === promise;
      fail(new KeyPortError(Reason.ABORTED, message, { data: { requestId: id, ...data }, cause }));
      if (sent) this.cancel(id).catch(() => {});
    };
    const onAbort = () => giveUp(`${method} was aborted by the page`, {}, signal.reason);

    try {
      if (typeof params === 'function') params = params();
    } catch (err) {
      fail(err);
      return promise;
    }
    if (signal?.aborted) {
      onAbort();
      return promise;
    }
    signal?.addEventListener?.('abort', onAbort, { once: true });
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => giveUp(`${method} took longer than ${timeoutMs} ms`, { timeoutMs }), timeoutMs);
    }

    this.#ensureOpen().then(() => {
      if (finished) return;
      this.#pending.set(id, { owner: promise, method, onProgress, resolve: succeed, reject: fail });
      try {
        this.#ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
      } catch (err) {
        fail(new KeyPortError(Reason.CONNECTION_LOST, 'could not send to the agent', { cause: err }));
      }
    }, fail);
    return promise;
  }

  async #ensureOpen() {
    if (this.#closedByUser) throw new KeyPortError(Reason.CLOSED, 'the client was closed');
    if (this.#state === 'open' && this.#ws?.readyState === OPEN) return;
    // Between backoff attempts a call retries at once rather than waiting for the timer.
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    try {
      await this.#open();
    } catch (err) {
      this.#scheduleReconnect();
      throw err;
    }
  }

  /** Opens one socket; resolves when open, rejects with a diagnosed KeyPortError. */
  #open() {
    if (this.#opening) return this.#opening;
    const started = Date.now();
    const reconnecting = this.#state === 'reconnecting';
    this.#setState(reconnecting ? 'reconnecting' : 'connecting');
    this.#opening = new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this.#WebSocket(this.#url);
      } catch (err) {
        // A malformed URL, or a browser refusing the scheme (mixed content) throws here.
        reject(new KeyPortError(Reason.AGENT_NOT_RUNNING, `cannot open ${this.#url}: ${err}`, { cause: err }));
        return;
      }
      let done = false;
      const timer = setTimeout(() => failed(true, undefined), this.#timeoutMs);
      const failed = (timedOut, event) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        detach(ws);
        try {
          ws.close();
        } catch {
          // never opened; nothing to close
        }
        const elapsedMs = Date.now() - started;
        diagnoseConnectFailure({ globals: this.#globals, elapsedMs, timedOut }).then((d) => {
          const closeCode = event && typeof event.code === 'number' ? event.code : undefined;
          reject(
            new KeyPortError(d.reason, connectMessage(d, this.#url), {
              data: { url: this.#url, elapsedMs, timedOut, closeCode, ...d },
            }),
          );
        });
      };
      // Browsers fire `error` then `close` (which carries the code): decide on `close`.
      ws.onerror = () => {};
      ws.onclose = (event) => failed(false, event);
      ws.onopen = () => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (this.#closedByUser) {
          detach(ws);
          ws.close(1000, 'client closed');
          reject(new KeyPortError(Reason.CLOSED, 'the client was closed'));
          return;
        }
        this.#ws = ws;
        ws.onmessage = (event) => this.#onMessage(event.data);
        ws.onclose = (event) => this.#onClose(ws, event);
        ws.onerror = () => {}; // the close event that follows does the work
        this.#attempt = 0;
        resolve();
        this.#setState('open');
      };
    }).finally(() => {
      this.#opening = null;
    });
    return this.#opening;
  }

  #onClose(ws, event) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    detach(ws);
    const data = { closeCode: event?.code, closeReason: event?.reason || undefined };
    this.#failPending(
      Reason.CONNECTION_LOST,
      `the connection to the agent was lost (close code ${event?.code})`,
      data,
    );
    if (this.#closedByUser) return;
    if (event?.code === CloseCode.IDLE) {
      // The agent closed an idle connection on purpose: reconnecting now would only hold its
      // small pool again. The next call opens a new connection.
      this.#setState('closed', data);
      return;
    }
    this.#setState('reconnecting', data);
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (!this.#backoff || this.#closedByUser || this.#reconnectTimer) return;
    if (this.#state !== 'reconnecting') this.#setState('reconnecting');
    const { initialDelayMs, maxDelayMs, factor } = this.#backoff;
    const delay = Math.min(maxDelayMs, initialDelayMs * factor ** this.#attempt);
    this.#attempt++;
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      this.#open().catch(() => this.#scheduleReconnect());
    }, delay);
  }

  #failPending(reason, message, data) {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(new KeyPortError(reason, message, { data }));
  }

  #onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return; // not JSON: nothing to route; the agent never sends this
    }
    if (msg === null || typeof msg !== 'object') return;
    if (msg.id !== undefined && msg.id !== null && msg.method === undefined) {
      const p = this.#pending.get(msg.id);
      if (!p) return; // an answer to an aborted call
      this.#pending.delete(msg.id);
      if (msg.error) p.reject(fromWireError(msg.error, p.method));
      else p.resolve(msg.result ?? {});
      return;
    }
    const params = msg.params ?? {};
    if (msg.method === 'tokens.changed') {
      for (const cb of [...this.#tokenListeners]) safeCall(cb, params.tokens ?? [], params);
    } else if (msg.method === 'sign.progress') {
      const p = this.#pending.get(params.requestId);
      if (p?.onProgress) {
        safeCall(p.onProgress, { requestId: params.requestId, done: params.done, total: params.total });
      }
    }
  }

  #setState(state, detail = {}) {
    if (this.#state === state) return;
    this.#state = state;
    for (const cb of [...this.#stateListeners]) safeCall(cb, state, detail);
  }
}

// ---- connect-failure diagnosis --------------------------------------------------------------

const LNA_PERMISSION_NAMES = ['loopback-network', 'local-network-access'];

/**
 * Decides between AGENT_NOT_RUNNING and LOOPBACK_BLOCKED after a WebSocket failed to open. A
 * browser shows a page the same close event (1006) for both, so this gathers what the page may
 * know. Returns `{reason, certainty: 'certain'|'likely', evidence: string[], permission}`.
 * See README.md, "Telling AGENT_NOT_RUNNING from LOOPBACK_BLOCKED".
 */
export async function diagnoseConnectFailure({ globals = globalThis, elapsedMs = 0, timedOut = false } = {}) {
  const evidence = [];
  const result = (reason, certainty, permission = undefined) => ({ reason, certainty, evidence, permission });
  const doc = globals.document;
  const loc = globals.location;
  if (!doc || !loc) {
    evidence.push('not a browser page: no Local Network Access rules apply');
    return result(Reason.AGENT_NOT_RUNNING, timedOut ? 'likely' : 'certain');
  }
  if (isLoopbackHost(loc.hostname)) {
    evidence.push(`the page is itself on loopback (${loc.hostname}): Local Network Access does not apply`);
    return result(Reason.AGENT_NOT_RUNNING, timedOut ? 'likely' : 'certain');
  }

  // 1. Permissions Policy: an iframe without allow="loopback-network" can never connect.
  const policy = doc.permissionsPolicy ?? doc.featurePolicy;
  if (policy && typeof policy.allowsFeature === 'function') {
    let known = [];
    try {
      known = policy.features?.() ?? policy.allowedFeatures?.() ?? [];
    } catch {
      known = [];
    }
    for (const name of LNA_PERMISSION_NAMES) {
      // allowsFeature() also says false for features the browser does not know: check features().
      if (known.includes(name) && !policy.allowsFeature(name)) {
        evidence.push(`Permissions Policy does not allow '${name}' in this document (iframe without allow="${name}"?)`);
        return result(Reason.LOOPBACK_BLOCKED, 'certain');
      }
    }
  }

  // 2. The permission itself.
  let permission;
  const query = globals.navigator?.permissions?.query;
  if (typeof query === 'function') {
    for (const name of LNA_PERMISSION_NAMES) {
      try {
        const status = await query.call(globals.navigator.permissions, { name });
        permission = status.state;
        evidence.push(`permission '${name}' is '${status.state}'`);
        break;
      } catch {
        // this browser does not know the name; try the next one
      }
    }
  }
  if (permission === 'denied') return result(Reason.LOOPBACK_BLOCKED, 'certain', permission);
  if (permission === 'granted') return result(Reason.AGENT_NOT_RUNNING, 'certain', permission);

  const inIframe = isInIframe(globals);
  if (inIframe) evidence.push('the page runs inside an iframe');
  if (globals.isSecureContext === false) {
    evidence.push('the page is not a secure context (http://): browsers with Local Network Access deny it loopback');
    if (permission !== undefined) return result(Reason.LOOPBACK_BLOCKED, 'certain', permission);
  }
  if (permission === 'prompt') {
    // A refused connection fails in milliseconds, before any prompt. A failure after a wait
    // means the browser held the connection for the user, who dismissed the prompt or has not
    // answered yet.
    if (timedOut || elapsedMs >= 1500) {
      evidence.push(timedOut ? 'the browser is still asking the user' : `failed after ${elapsedMs} ms (a prompt was likely shown and dismissed)`);
      return result(Reason.LOOPBACK_BLOCKED, 'likely', permission);
    }
    evidence.push(`failed after ${elapsedMs} ms, too fast for a prompt`);
    return result(Reason.AGENT_NOT_RUNNING, 'likely', permission);
  }
  evidence.push('this browser does not report a loopback permission');
  return result(Reason.AGENT_NOT_RUNNING, 'likely', permission);
}

function connectMessage(d, url) {
  return d.reason === Reason.LOOPBACK_BLOCKED
    ? `the browser blocked the connection to the KeyPort agent at ${url} (${d.evidence.at(-1)})`
    : `no KeyPort agent answered at ${url} (${d.evidence.at(-1)})`;
}

function isLoopbackHost(hostname = '') {
  const h = hostname.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

function isInIframe(globals) {
  try {
    return globals.window !== undefined && globals.window.top !== globals.window.self;
  } catch {
    return true; // a cross-origin top can throw in old browsers: that is an iframe
  }
}

// ---- encoding ------------------------------------------------------------------------------

function fromWireError(error, method) {
  const code = typeof error.code === 'number' ? error.code : null;
  const data = error.data && typeof error.data === 'object' ? error.data : {};
  const reason = typeof data.reason === 'string' ? data.reason : (REASON_BY_CODE[code] ?? 'INTERNAL');
  const err = new KeyPortError(reason, String(error.message ?? reason), { code, data });
  if (method === 'sign.batch' && Array.isArray(data.results)) {
    err.results = data.results.map(decodeSignResult); // the signatures finished before the failure
  }
  return err;
}

/** Builds `sign` / `sign.batch` params from the friendly form; sends only fields that are set. */
function signParams(req, batch) {
  const params = {};
  if (req.certificateId !== undefined) params.certificateId = req.certificateId;
  if (batch) {
    if (!Array.isArray(req.items)) throw invalid('items must be an array');
    params.items = req.items.map((item, i) => {
      const out = digestOrData(item, req.hash, `items[${i}]`);
      if (item.label !== undefined) out.label = item.label;
      return out;
    });
  } else {
    Object.assign(params, digestOrData(req, req.hash, ''));
  }
  // `hash` goes on the wire only for `data` (the agent refuses it beside a digest); for digests
  // given as bare bytes it named their algorithm above.
  const kinds = new Set(batch ? params.items.map((i) => ('data' in i ? 'data' : 'digest')) : ['data' in params ? 'data' : 'digest']);
  if (req.hash !== undefined && kinds.has('data')) {
    if (kinds.has('digest')) throw invalid('hash names the digest of data items: a batch mixing data and digest items cannot carry it');
    params.hash = req.hash;
  }
  for (const key of ['signatureAlgorithm', 'format', 'ecdsaEncoding', 'sm2UserId', 'display']) {
    if (req[key] !== undefined) params[key] = req[key];
  }
  return params;
}

/**
 * `digest` may be `{algorithm, value}` or just the bytes (then `hash` names the algorithm,
 * default SHA-256); `data` is the bytes for the agent to hash.
 */
function digestOrData(src, hash, where) {
  const at = where ? `${where}.` : '';
  if (src.digest !== undefined && src.data !== undefined) throw invalid(`${at}digest and ${at}data exclude each other`);
  if (src.data !== undefined) return { data: toBase64(src.data, `${at}data`) };
  if (src.digest === undefined) throw invalid(`${at}digest or ${at}data is required`);
  const d = src.digest;
  if (isBinary(d)) return { digest: { algorithm: hash ?? 'SHA-256', value: toBase64(d, `${at}digest`) } };
  return { digest: { algorithm: d.algorithm ?? hash ?? 'SHA-256', value: toBase64(d.value, `${at}digest.value`) } };
}

function decodeSignResult(r) {
  let out = withBytes(r, 'signature');
  if (typeof out.certificate === 'string') out = withBytes(out, 'certificate');
  return out;
}

/** Copies `obj` with `obj[key]` decoded to a Uint8Array and the string kept as `${key}Base64`. */
function withBytes(obj, key) {
  if (obj === null || typeof obj !== 'object' || typeof obj[key] !== 'string') {
    throw new KeyPortError(Reason.BAD_RESPONSE, `the agent's answer lacks the base64 field '${key}'`);
  }
  let bytes;
  try {
    bytes = fromBase64(obj[key], key);
  } catch (err) {
    throw new KeyPortError(Reason.BAD_RESPONSE, `the agent's '${key}' is not standard base64`, { cause: err });
  }
  return { ...obj, [key]: bytes, [`${key}Base64`]: obj[key] };
}

function requireArray(result, key) {
  if (!Array.isArray(result?.[key])) {
    throw new KeyPortError(Reason.BAD_RESPONSE, `the agent's answer lacks the array '${key}'`);
  }
  return result[key];
}

function invalid(message) {
  return new KeyPortError(Reason.INVALID_PARAMS, message, { code: -32602 });
}

function isBinary(v) {
  return typeof v === 'string' || v instanceof ArrayBuffer || ArrayBuffer.isView(v);
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
const B64_INDEX = new Map([...B64].map((c, i) => [c, i]));
const B64_SHAPE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Bytes from ArrayBuffer, any ArrayBuffer view, or a standard padded base64 string. */
export function toBytes(value, what = 'value') {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (typeof value === 'string') return fromBase64(value, what);
  throw invalid(`${what} must be an ArrayBuffer, a Uint8Array or a base64 string`);
}

/** Standard base64 with padding, from any accepted binary form (a string is checked and normalised). */
export function toBase64(value, what = 'value') {
  const bytes = toBytes(value, what);
  let out = '';
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    out += B64[(n >> 18) & 63] + B64[(n >> 12) & 63];
    out += i + 1 < bytes.length ? B64[(n >> 6) & 63] : '=';
    out += i + 2 < bytes.length ? B64[n & 63] : '=';
  }
  return out;
}

/** Decodes standard padded base64; anything else is INVALID_PARAMS (input) as the agent would say. */
export function fromBase64(text, what = 'value') {
  if (typeof text !== 'string' || !B64_SHAPE.test(text)) throw invalid(`${what} is not standard padded base64`);
  const pad = text.endsWith('==') ? 2 : text.endsWith('=') ? 1 : 0;
  // The bits after the last byte must be zero (canonical form), as the agent insists.
  const last = B64_INDEX.get(text[text.length - 1 - pad]);
  if (pad && last & (pad === 2 ? 15 : 3)) throw invalid(`${what} is not canonical base64 (non-zero trailing bits)`);
  const out = new Uint8Array((text.length / 4) * 3 - pad);
  let o = 0;
  for (let i = 0; i < text.length; i += 4) {
    const n =
      (B64_INDEX.get(text[i]) << 18) |
      (B64_INDEX.get(text[i + 1]) << 12) |
      ((B64_INDEX.get(text[i + 2]) ?? 0) << 6) |
      (B64_INDEX.get(text[i + 3]) ?? 0);
    out[o++] = (n >> 16) & 255;
    if (o < out.length) out[o++] = (n >> 8) & 255;
    if (o < out.length) out[o++] = n & 255;
  }
  return out;
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = () => {}; // keep Node's `ws` from throwing an unhandled 'error'
}

function safeCall(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    // A subscriber's bug must not break the connection; report it the way the platform does.
    if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
    else queueMicrotask(() => { throw err; });
  }
}
