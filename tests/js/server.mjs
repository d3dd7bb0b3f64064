// Starts a real `sandboxd serve` for the JS SDK tests (like tests/conftest.py does for Python): a free
// port on 127.0.0.1, a throw-away data dir, the cached templates; stopped with SIGTERM (--destroy-on-exit).
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, openSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const SANDBOXD = process.env.SANDBOXD_BIN || '/opt/sandboxd/venv/bin/sandboxd'
const TEMPLATES = process.env.SANDBOXD_TEMPLATES_DIR || '/var/lib/sandboxd/templates'
export const DOMAIN = 'js.sandboxd.test'
export { TEMPLATES }

// A templates dir of a test's own server, with the cached built-in templates (and their layers) linked in:
// what the test builds stays in that dir (TemplateStore.link_into, as tests/conftest.py's builder_server).
export function linkBuiltinTemplates(dir) {
  const python = join(SANDBOXD, '..', 'python')
  const code = 'import sys, pathlib; from sandboxd.templates.store import TemplateStore as S; ' +
    'S(pathlib.Path(sys.argv[1])).link_into(pathlib.Path(sys.argv[2]), ("base", "code-interpreter-v1"))'
  execFileSync(python, ['-c', code, TEMPLATES, dir])
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

export async function startServer({ templatesDir = TEMPLATES, cidr = '10.213.252.0/24' } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'sandboxd-js-'))
  const port = await freePort()
  const tlsPort = await freePort()
  const logPath = join(dir, 'server.log')
  const log = openSync(logPath, 'a')
  const proc = spawn(
    SANDBOXD,
    ['serve', '--host', '127.0.0.1', '--port', String(port), '--data-dir', join(dir, 'data'),
      '--templates-dir', templatesDir, '--destroy-on-exit',
      // a sandbox network of its own; names resolve nowhere but this host (nothing leaves the machine)
      '--network-cidr', cidr, '--dns', '127.0.0.1', '--domain', DOMAIN, '--tls-port', String(tlsPort)],
    { stdio: ['ignore', log, log] },
  )
  const url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 30_000
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`sandboxd exited:\n${readFileSync(logPath, 'utf8')}`)
    try {
      const r = await fetch(`${url}/health`)
      if (r.status === 204) break
    } catch {}
    if (Date.now() > deadline) {
      proc.kill('SIGKILL')
      throw new Error(`sandboxd did not become healthy:\n${readFileSync(logPath, 'utf8')}`)
    }
    await new Promise((r) => setTimeout(r, 50))
  }
  const key = readFileSync(logPath, 'utf8').match(/API key[^:]*: (e2b_[0-9a-f]{40})/)[1]
  process.env.E2B_API_URL = url
  process.env.E2B_SANDBOX_URL = url
  process.env.E2B_API_KEY = key
  process.env.E2B_VOLUME_API_URL = url // the volume content API: this same server
  return {
    url,
    key,
    log: () => readFileSync(logPath, 'utf8'),
    async stop() {
      const exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)))
      proc.kill('SIGTERM')
      const code = await exited
      if (code !== 0) throw new Error(`sandboxd exited with ${code}:\n${readFileSync(logPath, 'utf8')}`)
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
