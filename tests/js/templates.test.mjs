// Templates built with the official JS SDK's `Template` builder against a real sandboxd: files from a
// context (with a symlink), start and ready commands, the layer cache, tags, `exists`, a failing step.
// The server gets a templates dir of its own (the cached built-in templates linked in).
import assert from 'node:assert/strict'
import { mkdtempSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, test } from 'node:test'

import { Sandbox, Template, waitForPort } from 'e2b'

import { linkBuiltinTemplates, startServer } from './server.mjs'

let server
const dir = mkdtempSync(join(tmpdir(), 'sandboxd-js-tpl-'))
const ctx = join(dir, 'ctx')
const suffix = Math.random().toString(16).slice(2, 8)

before(async () => {
  const templates = join(dir, 'templates')
  linkBuiltinTemplates(templates)
  mkdirSync(join(ctx, 'app'), { recursive: true })
  writeFileSync(join(ctx, 'app', 'hello.txt'), 'hello from js\n')
  symlinkSync('hello.txt', join(ctx, 'app', 'link.txt'))
  server = await startServer({ templatesDir: templates, cidr: '10.213.253.0/24' })
})

after(async () => {
  if (server) await server.stop()
  rmSync(dir, { recursive: true, force: true })
})

test('build with files, env, workdir and a start command; a sandbox finds the service ready', async () => {
  const name = `js-full-${suffix}`
  const template = () =>
    Template({ fileContextPath: ctx })
      .fromBaseImage()
      .runCmd('echo building')
      .copy('app', '/home/user/app')
      .setEnvs({ JS_VAR: 'from-js' })
      .runCmd('mkdir -p /srv/www && echo served > /srv/www/index.html', { user: 'root' })
      .setWorkdir('/srv/www')
      .setStartCmd('python3 -m http.server 8123', waitForPort(8123))
  const logs = []
  const info = await Template.build(template(), `${name}:v1`, { onBuildLogs: (e) => logs.push(e.message) })
  assert.deepEqual(info.tags, ['v1'])
  assert.ok(logs.some((l) => l.includes('[finalize] ready')), logs.join('\n'))
  assert.equal(await Template.exists(name), true)
  assert.equal(await Template.exists(`${name}-nope`), false)

  const sbx = await Sandbox.create(`${name}:v1`)
  try {
    const r = await sbx.commands.run(
      'curl -s localhost:8123/index.html; cat /home/user/app/link.txt; readlink /home/user/app/link.txt; echo $JS_VAR; pwd')
    assert.deepEqual(r.stdout.split('\n').filter(Boolean), ['served', 'hello from js', 'hello.txt', 'from-js', '/srv/www'])
  } finally {
    await sbx.kill()
  }

  // the same template again: every step cached
  const again = []
  await Template.build(template(), `${name}:v1`, { onBuildLogs: (e) => again.push(e.message) })
  assert.equal(again.filter((l) => l.startsWith('CACHED')).length, 4, again.join('\n'))
})

test('background build, status with logs, tags, a failing step', async () => {
  const name = `js-bg-${suffix}`
  const info = await Template.buildInBackground(Template().fromBaseImage().runCmd('echo from-background'), name)
  let status
  let offset = 0
  const messages = []
  for (let i = 0; i < 600; i++) {
    status = await Template.getBuildStatus(info, { logsOffset: offset })
    offset += status.logEntries.length
    messages.push(...status.logEntries.map((e) => e.message))
    if (status.status === 'ready' || status.status === 'error') break
    await new Promise((r) => setTimeout(r, 200))
  }
  assert.equal(status.status, 'ready')
  assert.ok(messages.includes('from-background'), messages.join('\n'))

  const assigned = await Template.assignTags(name, ['stable'])
  assert.deepEqual(assigned.tags, ['stable'])
  assert.equal(await Template.exists(`${name}:stable`), true)
  await Template.removeTags(name, ['stable'])
  assert.equal(await Template.exists(`${name}:stable`), false)

  await assert.rejects(
    Template.build(Template().fromBaseImage().runCmd('echo broken >&2; exit 9'), `js-fail-${suffix}`),
    (e) => /status 9/.test(e.message) && /broken/.test(e.message),
  )
})
