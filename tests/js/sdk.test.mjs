// The official E2B JavaScript SDKs (npm `e2b`, `@e2b/code-interpreter`, pinned in package.json) against
// a real sandboxd: sandboxes, listing, commands, files, PTY, pause/resume, metrics, the code interpreter.
import assert from 'node:assert/strict'
import os from 'node:os'
import { after, before, describe, test } from 'node:test'

import { CommandExitError, FileType, Sandbox, SandboxNotFoundError, Volume } from 'e2b'
import { Sandbox as CodeSandbox } from '@e2b/code-interpreter'

import { DOMAIN, startServer } from './server.mjs'

let server
let sbx

before(async () => {
  server = await startServer()
  sbx = await Sandbox.create('base', { timeoutMs: 300_000, metadata: { suite: 'js' } })
})

after(async () => {
  if (sbx) await sbx.kill().catch(() => {})
  if (server) await server.stop()
})

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

describe('sandboxes', () => {
  test('create, info, timeout, kill', async () => {
    const s = await Sandbox.create('base', { timeoutMs: 60_000, envs: { FROM_CREATE: 'yes' } })
    const info = await s.getInfo()
    assert.equal(info.sandboxId, s.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.equal((await s.commands.run('echo $FROM_CREATE')).stdout, 'yes\n')
    await s.setTimeout(120_000)
    assert.equal(await s.isRunning(), true)
    await s.kill()
    assert.equal(await s.isRunning(), false)
    await assert.rejects(Sandbox.connect(s.sandboxId), SandboxNotFoundError)
  })

  test('list with metadata filter and pagination', async () => {
    const extra = await Promise.all([0, 1, 2].map(() => Sandbox.create('base', { metadata: { page: 'me' } })))
    try {
      const seen = []
      const pages = Sandbox.list({ query: { metadata: { page: 'me' } }, limit: 2 })
      while (pages.hasNext) seen.push(...(await pages.nextItems()))
      assert.deepEqual(seen.map((s) => s.sandboxId).sort(), extra.map((s) => s.sandboxId).sort())
      assert.ok(seen.every((s) => s.metadata.page === 'me' && s.state === 'running'))
    } finally {
      await Promise.all(extra.map((s) => s.kill()))
    }
  })

  test('pause and resume keep files and processes', async () => {
    const s = await Sandbox.create('base', { timeoutMs: 120_000 })
    try {
      await s.files.write('/home/user/kept.txt', 'still here')
      const bg = await s.commands.run('sleep 300', { background: true })
      assert.equal(await s.pause(), true)
      assert.equal(await s.isRunning(), false)
      const again = await Sandbox.connect(s.sandboxId)
      assert.equal(await again.files.read('/home/user/kept.txt'), 'still here')
      const procs = await again.commands.list()
      assert.ok(procs.some((p) => p.pid === bg.pid), 'the background process survived the pause')
    } finally {
      await s.kill()
    }
  })

  test('a pause without memory keeps the files, ends the processes; connect boots it again', async () => {
    const s = await Sandbox.create('base', { timeoutMs: 120_000 })
    try {
      await s.files.write('/home/user/kept.txt', 'on disk')
      await s.commands.run('sleep 300', { background: true })
      assert.equal(await s.pause({ keepMemory: false }), true)
      assert.equal(await s.pause({ keepMemory: false }), false) // paused already: 409
      assert.equal(await s.isRunning(), false)
      const again = await Sandbox.connect(s.sandboxId)
      assert.equal(await again.files.read('/home/user/kept.txt'), 'on disk')
      const procs = await again.commands.list()
      assert.ok(!procs.some((p) => p.cmd === 'sleep' || p.args?.includes('300')), 'a process survived')
      assert.equal((await again.commands.run('echo up')).stdout, 'up\n')
    } finally {
      await s.kill()
    }
  })

  test('a snapshot with memory and a fork carry the running process into new sandboxes', async () => {
    const src = await Sandbox.create('base', { timeoutMs: 120_000 })
    const made = []
    let snapshotId
    try {
      await src.files.write('/tmp/count.sh', 'n=0; while :; do n=$((n+1)); echo $n > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.02; done')
      await src.commands.run('nohup sh /tmp/count.sh > /dev/null 2>&1 &')
      await sleep(300)
      const counter = (await src.commands.run('pgrep -f count.sh')).stdout.trim()
      snapshotId = (await src.createSnapshot()).snapshotId
      made.push(await Sandbox.create(snapshotId, { timeoutMs: 60_000 }))
      const forks = await src.fork({ count: 2, timeoutMs: 60_000 })
      for (const f of forks) assert.ok(f instanceof Sandbox, String(f))
      made.push(...forks)
      for (const s of made) {
        assert.equal((await s.commands.run('pgrep -f count.sh')).stdout.trim(), counter) // the same process
        const first = Number(await s.files.read('/tmp/n'))
        await sleep(200)
        assert.ok(Number(await s.files.read('/tmp/n')) > first) // counting on, in the new sandbox
      }
      assert.equal((await src.commands.run('pgrep -f count.sh')).stdout.trim(), counter) // the source runs on
    } finally {
      for (const s of made) await s.kill().catch(() => {})
      await src.kill().catch(() => {})
      if (snapshotId) await Sandbox.deleteSnapshot(snapshotId).catch(() => {})
    }
  })

  test('metrics', async () => {
    const m = await sbx.getMetrics()
    assert.ok(m.length >= 1)
    assert.ok(m[0].memTotal > 0 && m[0].cpuCount >= 1 && m[0].diskTotal > 0)
    const past = await sbx.getMetrics({ start: new Date(Date.now() - 7_200_000), end: new Date(Date.now() - 3_600_000) })
    assert.deepEqual(past, [])
  })
})

describe('commands', () => {
  test('run, envs, cwd, user, exit errors', async () => {
    const r = await sbx.commands.run('echo $A; pwd; whoami', { envs: { A: 'x' }, cwd: '/tmp' })
    assert.equal(r.stdout, 'x\n/tmp\nuser\n')
    assert.equal((await sbx.commands.run('whoami', { user: 'root' })).stdout, 'root\n')
    await assert.rejects(sbx.commands.run('echo oops >&2; exit 3'), (e) => {
      assert.ok(e instanceof CommandExitError)
      assert.equal(e.exitCode, 3)
      assert.equal(e.stderr, 'oops\n')
      assert.equal(e.error, 'exit status 3')
      return true
    })
    assert.equal((await sbx.commands.run('sudo whoami')).stdout, 'root\n')
  })

  test('background, connect, stdin, kill', async () => {
    const h = await sbx.commands.run('cat', { background: true, stdin: true })
    await sbx.commands.sendStdin(h.pid, 'hello from js\n')
    const out = []
    const again = await sbx.commands.connect(h.pid, { onStdout: (d) => out.push(d) })
    await sbx.commands.sendStdin(h.pid, 'second line\n')
    for (let i = 0; i < 100 && !out.join('').includes('second line'); i++) await sleep(20)
    assert.match(out.join(''), /second line/)
    assert.equal(await sbx.commands.kill(h.pid), true)
    await assert.rejects(again.wait(), CommandExitError)
  })

  test('streaming callbacks', async () => {
    const chunks = []
    await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.05; done', { onStdout: (d) => chunks.push(d) })
    assert.equal(chunks.join(''), 'line1\nline2\nline3\n')
  })

  test('pty', async () => {
    let out = ''
    const pty = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => (out += new TextDecoder().decode(d)) })
    await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('tty; stty size; exit\n'))
    await pty.wait().catch(() => {})
    assert.match(out, /\/dev\/pts\/\d+/)
    assert.match(out, /24 80/)
  })

  test('the sandbox sees its own memory limit and CPUs', async () => {
    // the tests' server runs with the defaults: 512 MiB and 1 CPU per sandbox
    const meminfo = await sbx.files.read('/proc/meminfo')
    assert.match(meminfo, /^MemTotal: +524288 kB$/m)
    assert.equal((await sbx.commands.run("free -m | awk '/^Mem:/ {print $2}'")).stdout, '512\n')
    const cpus = String(Math.min(os.availableParallelism(), 1))
    assert.equal((await sbx.commands.run('nproc')).stdout, `${cpus}\n`)
    assert.equal((await sbx.commands.run('getconf _NPROCESSORS_ONLN')).stdout, `${cpus}\n`)
    // node inside the sandbox sizes itself to it too
    const inside = await sbx.commands.run(`node -e "const os = require('os'); console.log(os.availableParallelism(), os.totalmem() >> 20)"`)
    assert.equal(inside.stdout, `${cpus} 512\n`)
  })
})

describe('files', () => {
  test('write, read, list, info, exists, rename, remove, makeDir', async () => {
    await sbx.files.write('/home/user/js/a.txt', 'alpha')
    assert.equal(await sbx.files.read('/home/user/js/a.txt'), 'alpha')
    const bytes = await sbx.files.read('/home/user/js/a.txt', { format: 'bytes' })
    assert.equal(new TextDecoder().decode(bytes), 'alpha')
    const info = await sbx.files.getInfo('/home/user/js/a.txt')
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.size, 5)
    assert.equal(await sbx.files.exists('/home/user/js/a.txt'), true)
    assert.equal(await sbx.files.makeDir('/home/user/js/sub/deeper'), true)
    await sbx.files.write('/home/user/js/sub/deeper/b.txt', 'beta')
    const listed = (await sbx.files.list('/home/user/js', { depth: 3 })).map((e) => e.path)
    assert.deepEqual(listed, [
      '/home/user/js/a.txt',
      '/home/user/js/sub',
      '/home/user/js/sub/deeper',
      '/home/user/js/sub/deeper/b.txt',
    ])
    await sbx.files.rename('/home/user/js/a.txt', '/home/user/js/c.txt')
    assert.equal(await sbx.files.exists('/home/user/js/a.txt'), false)
    await sbx.files.remove('/home/user/js/sub')
    assert.equal(await sbx.files.exists('/home/user/js/sub'), false)
  })

  test('write many files and metadata', async () => {
    const res = await sbx.files.write([
      { path: '/home/user/many/1.txt', data: 'one' },
      { path: '/home/user/many/2.txt', data: 'two' },
    ])
    assert.deepEqual(res.map((w) => w.path), ['/home/user/many/1.txt', '/home/user/many/2.txt'])
    assert.equal(await sbx.files.read('/home/user/many/2.txt'), 'two')
  })

  test('watch', async () => {
    await sbx.files.makeDir('/home/user/watched')
    const events = []
    const w = await sbx.files.watchDir('/home/user/watched', (e) => events.push(e))
    await sbx.files.write('/home/user/watched/new.txt', 'x')
    for (let i = 0; i < 100 && !events.some((e) => e.name === 'new.txt'); i++) await sleep(20)
    await w.stop()
    assert.ok(events.some((e) => e.name === 'new.txt'), JSON.stringify(events))
  })

  test('signed upload and download URLs', async () => {
    const up = await sbx.uploadUrl('/home/user/signed.txt', { useSignatureExpiration: 60_000 })
    const form = new FormData()
    form.append('file', new Blob(['signed body']), 'signed.txt')
    const r = await fetch(up, { method: 'POST', body: form })
    assert.equal(r.status, 200, await r.text())
    const down = await sbx.downloadUrl('/home/user/signed.txt', { useSignatureExpiration: 60_000 })
    assert.equal(await (await fetch(down)).text(), 'signed body')
    const tampered = down.replace('signed.txt', 'other.txt')
    assert.equal((await fetch(tampered)).status, 401)
  })
})

describe('volumes', () => {
  test('create, files through the content API, two sandboxes share one, destroy', async () => {
    const vol = await Volume.create(`js-vol-${Date.now()}`)
    const made = []
    try {
      assert.ok((await Volume.list()).some((v) => v.volumeId === vol.volumeId))
      const written = await vol.writeFile('/in/hello.txt', 'from js\n', { force: true })
      assert.equal(written.size, 8)
      assert.equal(written.uid, 1000)
      await vol.makeDir('/made/deeper', { force: true })
      assert.deepEqual((await vol.list('/', { depth: 2 })).map((e) => e.path).sort(),
        ['/in', '/in/hello.txt', '/made', '/made/deeper'])
      assert.equal(await vol.readFile('/in/hello.txt'), 'from js\n')
      const a = await Sandbox.create('base', { timeoutMs: 60_000, volumeMounts: { '/data': vol } })
      made.push(a)
      const b = await Sandbox.create('base', { timeoutMs: 60_000, volumeMounts: { '/shared': vol.name } })
      made.push(b)
      assert.deepEqual((await a.getInfo()).volumeMounts, [{ name: vol.name, path: '/data' }])
      await a.commands.run('echo from-a > /data/a.txt')
      assert.equal((await b.commands.run('cat /shared/a.txt /shared/in/hello.txt')).stdout, 'from-a\nfrom js\n')
      assert.equal(await vol.readFile('/a.txt'), 'from-a\n')
      await vol.remove('/made')
      assert.equal(await vol.exists('/made/deeper'), false)
      await assert.rejects(Volume.destroy(vol.volumeId), /mounted by 2 sandbox/)
    } finally {
      for (const s of made) await s.kill().catch(() => {})
    }
    assert.equal(await Volume.destroy(vol.volumeId), true)
  })
})

describe('code interpreter', () => {
  let ci
  before(async () => {
    ci = await CodeSandbox.create({ timeoutMs: 300_000 })
  })
  after(async () => {
    if (ci) await ci.kill().catch(() => {})
  })

  test('runCode: state, results, errors', async () => {
    await ci.runCode('x = 6')
    const e = await ci.runCode('x * 7')
    assert.equal(e.text, '42')
    assert.equal((await ci.runCode("'a string'")).text, "'a string'")
    const err = await ci.runCode('1 / 0')
    assert.equal(err.error.name, 'ZeroDivisionError')
    const out = []
    await ci.runCode('print("streamed")', { onStdout: (m) => out.push(m.line) })
    assert.deepEqual(out, ['streamed\n'])
  })

  test('rich results and contexts', async () => {
    const html = await ci.runCode('import pandas as pd; pd.DataFrame({"a": [1, 2]})')
    assert.ok(html.results[0].html.includes('<table'))
    const png = await ci.runCode('import matplotlib.pyplot as plt; plt.plot([1, 2, 3]); plt.show()')
    assert.ok(png.results[0].png.length > 100)
    const ctx = await ci.createCodeContext({ cwd: '/tmp' })
    assert.equal((await ci.runCode('import os; os.getcwd()', { context: ctx })).text, "'/tmp'")
    assert.equal((await ci.runCode('[1, 2, 3].length', { language: 'js' })).text, '3')
    await ci.removeCodeContext(ctx)
  })
})

describe('network', () => {
  test('egress policy: create, info, live update; the host of a port', async () => {
    const s = await Sandbox.create('base', {
      timeoutMs: 60_000,
      allowInternetAccess: false,
      network: { allowOut: ['198.18.0.0/24', 'api.example.com'], denyOut: ({ allTraffic }) => [allTraffic] },
    })
    try {
      let info = await s.getInfo()
      assert.equal(info.allowInternetAccess, false)
      assert.deepEqual(info.network.allowOut, ['198.18.0.0/24', 'api.example.com'])
      assert.deepEqual(info.network.denyOut, ['0.0.0.0/0'])
      await s.updateNetwork({ denyOut: ['203.0.113.0/24'] })
      info = await s.getInfo()
      assert.deepEqual(info.network.denyOut, ['203.0.113.0/24'])
      assert.equal(info.network.allowOut, undefined, 'an update replaces the whole policy')
      assert.equal(s.getHost(8000), `8000-${s.sandboxId}.${DOMAIN}`)
      const route = await s.commands.run('ip route show default')
      assert.match(route.stdout, /^default via 10\.213\.252\.1 dev eth0/)
      await assert.rejects(s.updateNetwork({ allowOut: ['not a host!'] }), /allowOut/)
    } finally {
      await s.kill()
    }
  })
})
