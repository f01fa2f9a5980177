// Module interop that OHIF's bundler (webpack 5) provides and plain Node does not; `node --import` registers it.
//
// 1. dicom-parser ships one UMD file in which Node's CommonJS interop finds no named exports, so
//    dicom-image-loader's `import * as dicomParser from 'dicom-parser'` would see none of its functions: it is
//    resolved to dicom_parser_esm.mjs, which re-exports them by name, as the bundle does.
// 2. dicom-image-loader locates each codec's WebAssembly file with `new URL('<package>/<export>', import.meta.url)`,
//    which webpack resolves as a package path; Node reads it as a path relative to the decoder's own file.  The
//    decoders are loaded with that package path resolved the same way (import.meta.resolve).
import { register } from 'node:module';

register('./node_interop_hooks.mjs', import.meta.url);
