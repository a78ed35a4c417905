// The client against the golden fixtures in ../fixtures: every request fixture is produced by a
// client call (compared as JSON, modulo id), every response and error fixture is decoded.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { KeyPort, KeyPortError, fromBase64 } from '../src/keyport.js';
import { FakeAgent, FIXTURES, fixture, fixtureNames } from './fake-agent.js';

const b = (s) => fromBase64(s);
const nodeBytes = (s) => new Uint8Array(Buffer.from(s, 'base64')); // an independent decoder

// How a page makes each request fixture with the client's API. Binary values go in as every
// accepted form (Uint8Array, ArrayBuffer, DataView, base64 string) so all are exercised.
const CALLS = {
  hello: (c) => c.hello(),
  'hello.client': (c, p) => c.hello(p.client),
  'origin.requestAccess': (c) => c.requestAccess(),
  'tokens.list': (c) => c.listTokens(),
  'certificates.list': (c) => c.listCertificates(),
  'certificates.list.filter-*': (c, p) => c.listCertificates(p.filter),
  // A digest given as bare bytes: `hash` names its algorithm and is not sent.
  'sign.digest': (c, p) => c.sign({ certificateId: p.certificateId, digest: b(p.digest.value), display: p.display }),
  'sign.digest-all-options': (c, p) =>
    c.sign({
      certificateId: p.certificateId,
      digest: b(p.digest.value).buffer,
      hash: p.digest.algorithm,
      signatureAlgorithm: p.signatureAlgorithm,
      format: p.format,
      ecdsaEncoding: p.ecdsaEncoding,
      display: p.display,
    }),
  'sign.p1363': (c, p) =>
    c.sign({
      certificateId: p.certificateId,
      digest: { algorithm: p.digest.algorithm, value: p.digest.value },
      signatureAlgorithm: p.signatureAlgorithm,
      format: p.format,
      ecdsaEncoding: p.ecdsaEncoding,
      display: p.display,
    }),
  'sign.rsa-pss': (c, p) =>
    c.sign({
      certificateId: p.certificateId,
      digest: { algorithm: p.digest.algorithm, value: b(p.digest.value) },
      signatureAlgorithm: p.signatureAlgorithm,
      display: p.display,
    }),
  'sign.sm2-data': (c, p) =>
    c.sign({
      certificateId: p.certificateId,
      data: b(p.data),
      signatureAlgorithm: p.signatureAlgorithm,
      ecdsaEncoding: p.ecdsaEncoding,
      sm2UserId: p.sm2UserId,
      display: p.display,
    }),
  'sign.sm2-digest': (c, p) =>
    c.sign({ certificateId: p.certificateId, digest: b(p.digest.value), hash: 'SM3', display: p.display }),
  'sign.data': (c, p) => c.sign({ certificateId: p.certificateId, data: b(p.data), hash: p.hash, display: p.display }),
  'sign.data-ed25519': (c, p) =>
    c.sign({ certificateId: p.certificateId, data: b(p.data).buffer, signatureAlgorithm: p.signatureAlgorithm, display: p.display }),
  'sign.cms': (c, p) => c.sign({ certificateId: p.certificateId, data: p.data, format: p.format, display: p.display }),
  'sign.rsa-pkcs1': (c, p) => {
    const bytes = b(p.data);
    return c.sign({
      certificateId: p.certificateId,
      data: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength),
      signatureAlgorithm: p.signatureAlgorithm,
      display: p.display,
    });
  },
  'sign.batch*': (c, p) =>
    c.signBatch({
      certificateId: p.certificateId,
      items: p.items.map((i) => ({
        ...(i.data !== undefined ? { data: b(i.data) } : { digest: { algorithm: i.digest.algorithm, value: b(i.digest.value) } }),
        ...(i.label !== undefined ? { label: i.label } : {}),
      })),
      hash: p.hash,
      signatureAlgorithm: p.signatureAlgorithm,
      format: p.format,
      ecdsaEncoding: p.ecdsaEncoding,
      display: p.display,
    }),
  'authenticate*': (c, p) => c.authenticate(p),
  'cancel*': (c, p) => c.cancel(p.requestId),
  'keys.generate*': (c, p) => c.generateKey(p),
  'certificates.import': (c, p) => c.importCertificate({ tokenId: p.tokenId, certificate: b(p.certificate) }),
  'certificates.import.replace': (c, p) =>
    c.importCertificate({ tokenId: p.tokenId, certificate: p.certificate, replace: p.replace }),
};

function callFor(stem) {
  if (CALLS[stem]) return CALLS[stem];
  const key = Object.keys(CALLS).find((k) => k.endsWith('*') && stem.startsWith(k.slice(0, -1)));
  assert.ok(key, `no client call for fixture ${stem}.request.json: add one to CALLS`);
  return CALLS[key];
}

// What the client must return for each method, given the fixture's `result`.
function checkResult(method, got, want) {
  const decodedSign = (g, w) => {
    assert.deepEqual(g.signature, nodeBytes(w.signature));
    assert.equal(g.signatureBase64, w.signature);
    if (w.certificate !== undefined) {
      assert.deepEqual(g.certificate, nodeBytes(w.certificate));
      assert.equal(g.certificateBase64, w.certificate);
    }
    for (const k of ['format', 'signatureAlgorithm', 'digestAlgorithm']) assert.equal(g[k], w[k]);
  };
  switch (method) {
    case 'tokens.list':
      return assert.deepEqual(got, want.tokens);
    case 'certificates.list':
      assert.equal(got.length, want.certificates.length);
      return want.certificates.forEach((w, i) => {
        const { certificate, certificateBase64, ...rest } = got[i];
        assert.deepEqual(certificate, nodeBytes(w.certificate));
        assert.equal(certificateBase64, w.certificate);
        assert.deepEqual({ ...rest, certificate: w.certificate }, w);
      });
    case 'sign':
      return decodedSign(got, want);
    case 'sign.batch':
      assert.equal(got.length, want.results.length);
      return want.results.forEach((w, i) => decodedSign(got[i], w));
    case 'keys.generate':
      assert.deepEqual(got.csr, nodeBytes(want.csr));
      return assert.deepEqual({ keyId: got.keyId, csr: got.csrBase64 }, want);
    default: // hello, origin.requestAccess, authenticate (a Web eID token, kept as is), cancel, certificates.import
      return assert.deepEqual(got, want);
  }
}

async function connected() {
  const agent = new FakeAgent();
  const client = await KeyPort.connect({ WebSocket: agent.WebSocket, globals: {} });
  return { agent, client };
}

const requestFixtures = fixtureNames(/\.request\.json$/);
test('the fixtures folder holds request fixtures', () => assert.ok(requestFixtures.length >= 20));

for (const name of requestFixtures) {
  const stem = name.replace(/\.request\.json$/, '');
  test(`request ${name}: sent as the fixture; its response decoded`, async () => {
    const want = fixture(name);
    const { agent, client } = await connected();
    try {
      const call = callFor(stem)(client, structuredClone(want.params));
      const { message, socket } = await agent.nextRequest();
      assert.equal(message.id, call.requestId);
      assert.deepEqual({ ...message, id: want.id }, want);

      const responseName = existsSync(`${FIXTURES}${stem}.response.json`) ? `${stem}.response.json` : `${want.method}.response.json`;
      const response = fixture(responseName);
      socket.reply({ ...response, id: message.id });
      checkResult(want.method, await call, response.result);
    } finally {
      client.close();
    }
  });
}

test('cancel.not-pending.response.json decodes to {cancelled: false}', async () => {
  const { agent, client } = await connected();
  const call = client.cancel(42);
  const { message, socket } = await agent.nextRequest();
  assert.deepEqual(message.params, { requestId: 42 });
  socket.reply({ ...fixture('cancel.not-pending.response.json'), id: message.id });
  assert.deepEqual(await call, { cancelled: false });
  client.close();
});

for (const name of fixtureNames(/^error\..*\.json$/)) {
  test(`error ${name} becomes a KeyPortError with its reason, code and data`, async () => {
    const wire = fixture(name);
    const batch = name.startsWith('error.sign.batch.');
    const { agent, client } = await connected();
    const call = batch
      ? client.signBatch({ certificateId: 'c', items: [{ digest: new Uint8Array(32) }], display: { title: 'T' } })
      : client.requestAccess();
    const { message, socket } = await agent.nextRequest();
    socket.reply({ ...wire, id: message.id });
    const err = await call.then(
      () => assert.fail('the call should fail'),
      (e) => e,
    );
    assert.ok(err instanceof KeyPortError);
    assert.ok(err instanceof Error);
    assert.equal(err.reason, name.split('.').at(-2));
    assert.equal(err.reason, wire.error.data.reason);
    assert.equal(err.code, wire.error.code);
    assert.equal(err.message, wire.error.message);
    assert.deepEqual(err.data, wire.error.data);
    if (batch) {
      assert.equal(err.results.length, wire.error.data.completed);
      err.results.forEach((r, i) => assert.deepEqual(r.signature, nodeBytes(wire.error.data.results[i].signature)));
    }
    client.close();
  });
}

test('sign.progress.event.json reaches onProgress of the batch it names, and only that one', async () => {
  const event = fixture('sign.progress.event.json');
  const { agent, client } = await connected();
  const seen = [];
  const other = client.signBatch({ certificateId: 'c', items: [{ digest: new Uint8Array(32) }], display: { title: 'A' }, onProgress: () => assert.fail('wrong batch') });
  const batch = client.signBatch({
    certificateId: 'c',
    items: [{ digest: new Uint8Array(32) }],
    display: { title: 'B' },
    onProgress: (p) => seen.push(p),
  });
  const first = await agent.nextRequest();
  const { message, socket } = await agent.nextRequest();
  assert.equal(message.id, batch.requestId);
  socket.reply({ ...event, params: { ...event.params, requestId: message.id } });
  socket.reply({ ...fixture('sign.batch.response.json'), id: message.id });
  socket.reply({ ...fixture('sign.batch.response.json'), id: first.message.id });
  await batch;
  await other;
  assert.deepEqual(seen, [{ requestId: message.id, done: event.params.done, total: event.params.total }]);
  client.close();
});

for (const name of fixtureNames(/^tokens\.changed.*\.event\.json$/)) {
  test(`${name} reaches every subscriber until it unsubscribes`, async () => {
    const event = fixture(name);
    const { agent, client } = await connected();
    const a = [];
    const b2 = [];
    const offA = client.onTokensChanged((tokens) => a.push(tokens));
    client.onTokensChanged((tokens) => b2.push(tokens));
    const socket = agent.sockets[0];
    socket.reply(event);
    // A request round trip after the event proves the event was handled (messages are in order).
    const ping = client.hello();
    const req = await agent.nextRequest();
    req.socket.reply({ ...fixture('hello.response.json'), id: req.message.id });
    await ping;
    assert.deepEqual(a, [event.params.tokens]);
    assert.deepEqual(b2, [event.params.tokens]);

    offA();
    socket.reply(event);
    const ping2 = client.hello();
    const req2 = await agent.nextRequest();
    req2.socket.reply({ ...fixture('hello.response.json'), id: req2.message.id });
    await ping2;
    assert.equal(a.length, 1);
    assert.equal(b2.length, 2);
    client.close();
  });
}

// invalid/INVALID_PARAMS.base64-*: the client refuses the same bad base64 itself, sending nothing.
for (const name of ['bad-length', 'no-padding', 'nonzero-trailing-bits', 'urlsafe', 'whitespace']) {
  test(`invalid/INVALID_PARAMS.base64-${name}.json is refused locally as INVALID_PARAMS`, async () => {
    const wire = fixture(`invalid/INVALID_PARAMS.base64-${name}.json`);
    const { agent, client } = await connected();
    const p = wire.params;
    const call =
      wire.method === 'certificates.import'
        ? client.importCertificate({ tokenId: p.tokenId, certificate: p.certificate })
        : client.sign({ certificateId: p.certificateId, digest: p.digest, display: p.display });
    await assert.rejects(call, (e) => e instanceof KeyPortError && e.reason === 'INVALID_PARAMS' && e.code === -32602);
    const sent = client.hello();
    const { message, socket } = await agent.nextRequest();
    assert.equal(message.method, 'hello', 'the bad request was never sent');
    socket.reply({ ...fixture('hello.response.json'), id: message.id });
    await sent;
    client.close();
  });
}
