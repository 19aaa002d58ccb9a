// Builds the softphone into dist/: JsSIP (from npm) and our code bundled by esbuild.
import { build } from 'esbuild';
import { mkdirSync, copyFileSync } from 'node:fs';

mkdirSync('dist', { recursive: true });
await build({
  entryPoints: ['src/phone.js'],
  bundle: true,
  minify: true,
  sourcemap: true,
  format: 'iife',
  target: ['chrome110', 'firefox115', 'safari16'],
  outfile: 'dist/phone.js',
  logLevel: 'warning',
});
for (const f of ['phone.html', 'phone.css']) copyFileSync(`src/${f}`, `dist/${f}`);
console.log('web/dist built');
