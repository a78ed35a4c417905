// Connection behaviour: ids, connect failures and their diagnosis, loss and reconnect, abort,
// close. The agent's side is the fake WebSocket of fake-agent.js.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KeyPort, KeyPortError, diagnoseConnectFailure } from '../src/keyport.js';
import { FakeAgent, fixture, stateReached } from './fake-agent.js';

const fast = { initialDelayMs: 1, maxDelayMs: 4, factor: 2 };

async function connected(options = {}) {
  const agent = new FakeAgent();
  const client = await KeyPort.connect({ WebSocket: agent.WebSocket, globals: {}, reconnect: fast, ...options });
  return { agent, client };
}

/** Answers the next request with the hello fixture and returns the request. */
async function answerHello(agent) {
  const req = await agent.nextRequest();
  req.socket.reply({ ...fixture('hello.response.json'), id: req.message.id });
  return req;
}

test('connect uses the default URL and requests get ids 1, 2, 3 on one socket', async () => {
  const { agent, client } = await connected();
  assert.equal(agent.sockets[0].url, 'ws://127.0.0.1:47333/v1');
  assert.equal(client.state, 'open');
  const calls = [client.hello({ name: 'test', version: '1' }), client.requestAccess(), client.listTokens()];
  const ids = [];
  for (let i = 0; i < 3; i++) {
    const { message } = await agent.nextRequest();
    assert.equal(message.jsonrpc, '2.0');
    ids.push(message.id);
  }
  assert.deepEqual(ids, [1, 2, 3]);
  assert.deepEqual(calls.map((c) => c.requestId), [1, 2, 3]);
  assert.equal(agent.sockets.length, 1);
  client.close();
  await Promise.allSettled(calls);
});

test('answers are matched by id, not by order', async () => {
  const { agent, client } = await connected();
  const a = client.hello();
  const b = client.requestAccess();
  const ra = await agent.nextRequest();
  const rb = await agent.nextRequest();
  rb.socket.reply({ jsonrpc: '2.0', id: rb.message.id, result: { approved: true, remembered: false } });
  ra.socket.reply({ ...fixture('hello.response.json'), id: ra.message.id });
  assert.deepEqual(await b, { approved: true, remembered: false });
  assert.equal((await a).agent, 'keyport');
  client.close();
});

test('nothing listening: connect rejects with AGENT_NOT_RUNNING', async () => {
  const agent = new FakeAgent();
  agent.mode = 'refuse';
  const err = await KeyPort.connect({ WebSocket: agent.WebSocket, url: 'ws://127.0.0.1:1/v1', globals: {} }).catch((e) => e);
  assert.ok(err instanceof KeyPortError);
  assert.equal(err.reason, 'AGENT_NOT_RUNNING');
  assert.equal(err.code, null);
  assert.equal(err.data.reason, 'AGENT_NOT_RUNNING');
  assert.equal(err.data.url, 'ws://127.0.0.1:1/v1');
  assert.equal(err.data.certainty, 'certain');
  assert.equal(err.data.closeCode, 1006);
  assert.equal(agent.sockets.length, 1, 'a failed connect does not retry on its own');
});

test('a handshake that never completes times out as AGENT_NOT_RUNNING (timedOut)', async () => {
  const agent = new FakeAgent();
  agent.mode = 'hang';
  const err = await KeyPort.connect({ WebSocket: agent.WebSocket, globals: {}, timeoutMs: 20 }).catch((e) => e);
  assert.equal(err.reason, 'AGENT_NOT_RUNNING');
  assert.equal(err.data.timedOut, true);
});

// A browser page as diagnoseConnectFailure sees it.
function page({ hostname = 'portal.example', permission, policy, secure = true, iframe = false } = {}) {
  const self = {};
  const win = { self, top: iframe ? {} : self };
  return {
    window: win,
    isSecureContext: secure,
    location: { hostname },
    document: policy ? { permissionsPolicy: policy } : {},
    navigator: {
      permissions: {
        async query({ name }) {
          if (permission && name === permission.name) return { state: permission.state };
          throw new TypeError(`'${name}' is not a valid enum value of type PermissionName`);
        },
      },
    },
  };
}

test('permission denied: connect rejects with LOOPBACK_BLOCKED (certain)', async () => {
  const agent = new FakeAgent();
  agent.mode = 'refuse';
  const globals = page({ permission: { name: 'loopback-network', state: 'denied' } });
  const err = await KeyPort.connect({ WebSocket: agent.WebSocket, globals }).catch((e) => e);
  assert.equal(err.reason, 'LOOPBACK_BLOCKED');
  assert.equal(err.data.certainty, 'certain');
  assert.equal(err.data.permission, 'denied');
});

test('diagnosis: the older permission name local-network-access is asked too', async () => {
  const d = await diagnoseConnectFailure({ globals: page({ permission: { name: 'local-network-access', state: 'denied' } }) });
  assert.equal(d.reason, 'LOOPBACK_BLOCKED');
});

test('diagnosis: an iframe whose Permissions Policy lacks loopback-network is LOOPBACK_BLOCKED', async () => {
  const policy = { features: () => ['loopback-network', 'camera'], allowsFeature: (f) => f !== 'loopback-network' };
  const d = await diagnoseConnectFailure({ globals: page({ policy, iframe: true }) });
  assert.deepEqual([d.reason, d.certainty], ['LOOPBACK_BLOCKED', 'certain']);
});

test('diagnosis: a policy that does not know the feature proves nothing', async () => {
  const policy = { features: () => ['camera'], allowsFeature: () => false };
  const d = await diagnoseConnectFailure({ globals: page({ policy }) });
  assert.equal(d.reason, 'AGENT_NOT_RUNNING');
});

test('diagnosis: permission granted means the agent is not there', async () => {
  const d = await diagnoseConnectFailure({ globals: page({ permission: { name: 'loopback-network', state: 'granted' } }) });
  assert.deepEqual([d.reason, d.certainty], ['AGENT_NOT_RUNNING', 'certain']);
});

test('diagnosis: prompt state decides by time (fast refusal vs a prompt that was shown)', async () => {
  const globals = page({ permission: { name: 'loopback-network', state: 'prompt' } });
  const fastFail = await diagnoseConnectFailure({ globals, elapsedMs: 3 });
  assert.deepEqual([fastFail.reason, fastFail.certainty], ['AGENT_NOT_RUNNING', 'likely']);
  const slowFail = await diagnoseConnectFailure({ globals, elapsedMs: 4000 });
  assert.deepEqual([slowFail.reason, slowFail.certainty], ['LOOPBACK_BLOCKED', 'likely']);
  const timedOut = await diagnoseConnectFailure({ globals, elapsedMs: 15000, timedOut: true });
  assert.equal(timedOut.reason, 'LOOPBACK_BLOCKED');
});

test('diagnosis: a page on loopback is never LOOPBACK_BLOCKED', async () => {
  for (const hostname of ['127.0.0.1', 'localhost', '[::1]']) {
    const globals = page({ hostname, permission: { name: 'loopback-network', state: 'denied' } });
    const d = await diagnoseConnectFailure({ globals });
    assert.equal(d.reason, 'AGENT_NOT_RUNNING', hostname);
  }
});

test('diagnosis: an http:// page in a browser with the permission is LOOPBACK_BLOCKED', async () => {
  const d = await diagnoseConnectFailure({ globals: page({ secure: false, permission: { name: 'loopback-network', state: 'prompt' } }) });
  assert.equal(d.reason, 'LOOPBACK_BLOCKED');
});

test('diagnosis: a browser without the permission (Firefox, Safari) says AGENT_NOT_RUNNING, likely', async () => {
  const d = await diagnoseConnectFailure({ globals: page({ iframe: true }) });
  assert.deepEqual([d.reason, d.certainty], ['AGENT_NOT_RUNNING', 'likely']);
  assert.ok(d.evidence.some((e) => e.includes('iframe')));
});

test('agent restart: pending calls fail with CONNECTION_LOST, the client reconnects and resends nothing', async () => {
  const { agent, client } = await connected();
  const states = [];
  client.onStateChange((s) => states.push(s));
  const pending = client.sign({ certificateId: 'c', digest: new Uint8Array(32), display: { title: 'T' } });
  const first = await agent.nextRequest();
  assert.equal(first.message.method, 'sign');

  const reopened = stateReached(client, 'open');
  first.socket.drop(1006);
  const err = await pending.catch((e) => e);
  assert.equal(err.reason, 'CONNECTION_LOST');
  assert.equal(err.data.closeCode, 1006);
  await reopened;
  assert.deepEqual(states, ['reconnecting', 'open']);
  assert.equal(agent.sockets.length, 2);

  const next = client.hello();
  const req = await answerHello(agent);
  assert.equal(req.socket, agent.sockets[1]);
  assert.equal(req.message.method, 'hello', 'the lost sign was not re-sent');
  assert.equal(req.message.id, 2, 'ids keep counting across connections');
  await next;
  client.close();
});

test('an idle close (1000) from the agent is not followed by a reconnect; the next call opens again', async () => {
  const { agent, client } = await connected();
  const closed = stateReached(client, 'closed');
  agent.sockets[0].drop(1000);
  const detail = await closed;
  assert.equal(detail.closeCode, 1000);
  await new Promise((r) => setImmediate(r));
  assert.equal(agent.sockets.length, 1, 'no reconnect on its own');
  const next = client.hello();
  const req = await answerHello(agent);
  assert.equal(req.socket, agent.sockets[1]);
  await next;
  assert.equal(client.state, 'open');
  client.close();
});

test('reconnect keeps backing off while the agent is down, then succeeds', async () => {
  const { agent, client } = await connected();
  agent.mode = 'refuse';
  const reopened = stateReached(client, 'open');
  // The first two reconnect attempts are refused; the agent is back for the third.
  agent.onSocket = (_socket, count) => {
    if (count === 4) agent.mode = 'accept';
  };
  agent.sockets[0].drop();
  await reopened;
  assert.equal(agent.sockets.length, 4);
  assert.equal(client.state, 'open');
  client.close();
});

test('a call while reconnecting tries at once and fails with AGENT_NOT_RUNNING if still down', async () => {
  const { agent, client } = await connected({ reconnect: { initialDelayMs: 60000 } });
  const lost = stateReached(client, 'reconnecting');
  agent.mode = 'refuse';
  agent.sockets[0].drop();
  await lost;
  const err = await client.hello().catch((e) => e);
  assert.equal(err.reason, 'AGENT_NOT_RUNNING');
  assert.equal(agent.sockets.length, 2, 'the call made one attempt of its own');

  agent.mode = 'accept';
  const ok = client.hello();
  await answerHello(agent);
  assert.equal((await ok).agent, 'keyport');
  assert.equal(client.state, 'open');
  client.close();
});

test('AbortSignal: the call fails with ABORTED at once and the agent gets cancel for its id', async () => {
  const { agent, client } = await connected();
  const ac = new AbortController();
  const call = client.sign({ certificateId: 'c', digest: new Uint8Array(32), display: { title: 'T' }, signal: ac.signal });
  const { message, socket } = await agent.nextRequest();
  ac.abort();
  const err = await call.catch((e) => e);
  assert.equal(err.reason, 'ABORTED');
  assert.equal(err.data.requestId, message.id);
  const cancel = await agent.nextRequest();
  assert.equal(cancel.message.method, 'cancel');
  assert.deepEqual(cancel.message.params, { requestId: message.id });
  // The agent's late USER_CANCELLED for the aborted call is dropped without harm.
  socket.reply({ ...fixture('error.USER_CANCELLED.json'), id: message.id });
  socket.reply({ ...fixture('cancel.response.json'), id: cancel.message.id });
  const after = client.hello();
  await answerHello(agent);
  await after;
  client.close();
});

test('an already aborted signal sends nothing', async () => {
  const { agent, client } = await connected();
  const err = await client.listTokens({ signal: AbortSignal.abort() }).catch((e) => e);
  assert.equal(err.reason, 'ABORTED');
  const next = client.hello();
  const req = await answerHello(agent);
  assert.equal(req.message.method, 'hello');
  assert.equal(req.message.id, 2);
  await next;
  client.close();
});

test('close(): pending calls fail with CLOSED, later calls too, and no reconnect happens', async () => {
  const { agent, client } = await connected();
  const pending = client.requestAccess();
  await agent.nextRequest();
  client.close();
  assert.equal((await pending.catch((e) => e)).reason, 'CLOSED');
  assert.equal((await client.hello().catch((e) => e)).reason, 'CLOSED');
  assert.equal(client.state, 'closed');
  assert.equal(agent.sockets.length, 1);
  assert.equal(agent.sockets[0].readyState, 3);
});

test('bad input rejects (never throws) with INVALID_PARAMS and sends nothing', async () => {
  const { agent, client } = await connected();
  const cases = [
    () => client.sign({ certificateId: 'c', display: { title: 'T' } }),
    () => client.sign({ certificateId: 'c', digest: new Uint8Array(32), data: new Uint8Array(1), display: { title: 'T' } }),
    () => client.sign({ certificateId: 'c', digest: 42, display: { title: 'T' } }),
    () => client.signBatch({ certificateId: 'c', items: 'x', display: { title: 'T' } }),
    () => client.signBatch({ certificateId: 'c', hash: 'SHA-384', items: [{ data: 'AA==' }, { digest: new Uint8Array(32) }], display: { title: 'T' } }),
    () => client.authenticate({ challenge: 123 }),
  ];
  for (const make of cases) {
    const p = make();
    assert.ok(p instanceof Promise);
    await assert.rejects(p, (e) => e instanceof KeyPortError && e.reason === 'INVALID_PARAMS');
  }
  const next = client.hello();
  const req = await answerHello(agent);
  assert.equal(req.message.method, 'hello');
  await next;
  client.close();
});

test('a malformed answer becomes BAD_RESPONSE', async () => {
  const { agent, client } = await connected();
  const call = client.listCertificates();
  const { message, socket } = await agent.nextRequest();
  socket.reply({ jsonrpc: '2.0', id: message.id, result: { certificates: [{ id: 'x', certificate: 'not base64!' }] } });
  assert.equal((await call.catch((e) => e)).reason, 'BAD_RESPONSE');
  client.close();
});

test('per-call timeoutMs fails with ABORTED and cancels on the agent', async () => {
  const { agent, client } = await connected();
  const call = client.requestAccess({ timeoutMs: 10 });
  const { message } = await agent.nextRequest();
  const err = await call.catch((e) => e);
  assert.equal(err.reason, 'ABORTED');
  assert.equal(err.data.timeoutMs, 10);
  const cancel = await agent.nextRequest();
  assert.deepEqual(cancel.message.params, { requestId: message.id });
  client.close();
});
