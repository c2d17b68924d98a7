"""A small in-memory fake of the Hugging Face Hub HTTP API, for tests (standard library only).

Enough of the Hub for the real `huggingface_hub` client, pointed at it with
`HF_ENDPOINT=http://127.0.0.1:PORT`, to create repos, upload files, read repo info and download:

    POST   /api/repos/create                              create_repo (409 when it exists)
    DELETE /api/repos/delete                              delete_repo
    POST   /api/validate-yaml                             README.md front matter check (upload_*, create_commit)
    GET    /api/whoami-v2                                 whoami
    GET    /api/agent-harnesses                           fetched by the client for its user agent
    GET    /api/{type}s/{ns}/{name}[/revision/{rev}]      repo_info / model_info (sha, siblings)
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]   list_repo_tree (snapshot_download)
    GET    /api/{type}s/{ns}/{name}/refs                  list_repo_refs
    POST   /api/{type}s/{ns}/{name}/preupload/{rev}       upload modes, with the stored file's git oid
    POST   /api/{type}s/{ns}/{name}/commit/{rev}          the NDJSON commit
    HEAD   /[{type}s/]{ns}/{name}/resolve/{rev}/{path}    file_exists, hf_hub_download metadata
    GET    /[{type}s/]{ns}/{name}/resolve/{rev}/{path}    hf_hub_download

Every file goes the "regular" way: preupload answers `uploadMode: "regular"`, so the client sends the
bytes base64-encoded inside the NDJSON commit and neither LFS nor Xet is involved. Preupload also
returns the git blob sha1 (`oid`) of a file already stored at that path, which is what lets the client
skip unchanged files (and a commit that would change nothing).

Repos live in memory with their whole history: every commit is a full snapshot of the files and gets
a new 40-hex sha, so a test can count commits or read any revision. Repo ids are `namespace/name`.
Writes need an `Authorization: Bearer ...` header (any token); reads of public repos do not.

Run it by hand with `python tests/hub_server.py [--port N]`.
"""
import base64
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ('model', 'dataset', 'space')
GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n'
_COMMIT_RE = re.compile(r'^[0-9a-f]{40}$')


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's `oid` and ETag."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    oid: str


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    description: str
    files: Dict[str, Blob]
    date: str
    changed: List[str]  # paths the commit payload wrote or deleted


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: Dict[str, Commit] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)  # name ('main', 'refs/pr/1') -> commit oid
    num_prs: int = 0

    def resolve(self, revision: str) -> Optional[Commit]:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision) if _COMMIT_RE.match(revision) else None

    def history(self, revision: str = 'main') -> List[Commit]:
        """Commits reachable from `revision`, newest first."""
        out, commit = [], self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


class HubError(Exception):
    """An HTTP error answered the way the Hub does: status, `X-Error-Code` and a JSON `error`."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _now() -> str:
    return datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'


def _front_matter(text: str) -> Tuple[Optional[dict], Optional[str]]:
    """The YAML metadata block of a README.md: (mapping or None, error message or None)."""
    match = re.match(r'^---\s*\n(.*?)\n---\s*(\n|$)', text, re.DOTALL)
    if not match:
        return None, None
    try:
        import yaml
    except ImportError:  # nothing to check with
        return None, None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return None, f'invalid YAML in the metadata block: {e}'
    if data is not None and not isinstance(data, dict):
        return None, 'the metadata block must be a YAML mapping'
    return data or {}, None


class FakeHub:
    """The store plus the HTTP server; `start()` binds 127.0.0.1 on a free port and serves in a thread."""

    def __init__(self, host: str = '127.0.0.1', port: int = 0):
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.repos: Dict[Tuple[str, str], Repo] = {}
        self.requests: List[Tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unhandled: List[Tuple[str, str]] = []  # requests that matched no route
        self.errors: List[str] = []  # exceptions raised while serving (a bug in this file)
        self._counter = itertools.count()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f'http://{self.host}:{self.port}'

    def start(self) -> 'FakeHub':
        handler = type('Handler', (_Handler,), {'hub': self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name='fake-hub', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def __enter__(self) -> 'FakeHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every repo and the request log."""
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.errors.clear()

    # --- inspection, for tests ------------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = 'model') -> Repo:
        with self.lock:
            return self.repos[(repo_type, repo_id)]

    def commit_count(self, repo_id: str, revision: str = 'main', repo_type: str = 'model') -> int:
        """Number of commits on `revision`, the one made when the repo was created included."""
        with self.lock:
            return len(self.repo(repo_id, repo_type).history(revision))

    def files(self, repo_id: str, revision: str = 'main', repo_type: str = 'model') -> Dict[str, bytes]:
        with self.lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            return {path: blob.data for path, blob in commit.files.items()}

    # --- store operations -----------------------------------------------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = 'model', private: bool = False) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f'You already created this {repo_type} repo: {repo_id}')
            repo = Repo(repo_type, repo_id, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            self._commit(repo, 'main', None, 'initial commit', '', {'.gitattributes': GITATTRIBUTES}, [])
            return repo

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, 'Repository not found', 'RepoNotFound')
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        return commit

    def _commit(self, repo: Repo, branch: str, parent: Optional[str], title: str, description: str,
                added: Dict[str, bytes], deleted: List[Tuple[str, bool]]) -> Commit:
        files = dict(repo.commits[parent].files) if parent else {}
        for path, is_folder in deleted:
            if is_folder:
                prefix = path.rstrip('/') + '/'
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", 'EntryNotFound')
                for p in gone:
                    del files[p]
            elif files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", 'EntryNotFound')
        changed = [p for p, _ in deleted]
        for path, data in added.items():
            files[path] = Blob(data, git_blob_sha1(data))
            changed.append(path)
        seed = f'{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n{next(self._counter)}\n'
        seed += '\n'.join(f'{p} {b.oid}' for p, b in sorted(files.items()))
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, description, files, _now(), changed)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass made by FakeHub.start
    protocol_version = 'HTTP/1.1'
    server_version = 'FakeHub/1.0'

    def log_message(self, format, *args):  # keep test output quiet; FakeHub.requests has the log
        pass

    # --- plumbing -------------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch('GET')

    def do_HEAD(self):
        self._dispatch('HEAD')

    def do_POST(self):
        self._dispatch('POST')

    def do_PUT(self):
        self._dispatch('PUT')

    def do_DELETE(self):
        self._dispatch('DELETE')

    def _read_body(self) -> bytes:
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _json_body(self):
        try:
            return json.loads(self.body or b'{}')
        except ValueError:
            raise HubError(400, 'request body is not JSON')

    @property
    def authorized(self) -> bool:
        auth = self.headers.get('Authorization', '')
        return auth.startswith('Bearer ') and len(auth) > len('Bearer ')

    def _require_auth(self) -> None:
        if not self.authorized:
            raise HubError(401, 'Invalid username or password.')

    def _send(self, status: int, body: bytes = b'', content_type: str = 'application/json',
              headers: Optional[Dict[str, str]] = None, length: Optional[int] = None) -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)
        self.status = status

    def _send_json(self, data, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _dispatch(self, method: str) -> None:
        self.status = 0
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        segments = [unquote(s) for s in url.path.strip('/').split('/')] if url.path.strip('/') else []
        try:
            with self.hub.lock:
                if not self._route(method, segments):
                    self.hub.unhandled.append((method, self.path))
                    raise HubError(404, f'no route for {method} {url.path} in the fake Hub')
        except HubError as e:
            headers = {'X-Error-Message': e.message}
            if e.code:
                headers['X-Error-Code'] = e.code
            self._send_json({'error': e.message}, e.status, headers)
        except Exception as e:  # a bug here, reported to the tests through FakeHub.errors
            self.hub.errors.append(f'{method} {self.path}: {type(e).__name__}: {e}')
            self._send_json({'error': f'fake Hub failure: {e}'}, 500)
        finally:
            self.hub.requests.append((method, self.path, self.status))

    # --- routes ---------------------------------------------------------------------------------------

    def _route(self, method: str, s: List[str]) -> bool:
        if s[:1] == ['api']:
            return self._route_api(method, s[1:])
        # /{ns}/{name}/resolve/{rev}/{path...}, with an optional datasets/ or spaces/ prefix
        repo_type = 'model'
        if s[:1] in (['datasets'], ['spaces']):
            repo_type, s = s[0][:-1], s[1:]
        if len(s) >= 5 and s[2] == 'resolve' and method in ('GET', 'HEAD'):
            self.resolve_file(repo_type, f'{s[0]}/{s[1]}', s[3], '/'.join(s[4:]))
            return True
        return False

    def _route_api(self, method: str, s: List[str]) -> bool:
        if s == ['agent-harnesses'] and method == 'GET':
            self._send_json({'standardEnvVars': [], 'harnesses': {}})
        elif s == ['whoami-v2'] and method == 'GET':
            self._require_auth()
            self._send_json({'type': 'user', 'name': 'zoo-tester', 'fullname': 'zoo tester', 'orgs': [],
                             'auth': {'type': 'access_token', 'accessToken': {'displayName': 'test', 'role': 'write'}}})
        elif s == ['repos', 'create'] and method == 'POST':
            self.create_repo()
        elif s == ['repos', 'delete'] and method == 'DELETE':
            self.delete_repo()
        elif s == ['validate-yaml'] and method == 'POST':
            self.validate_yaml()
        elif len(s) >= 3 and s[0] in ('models', 'datasets', 'spaces'):
            repo_type, repo_id, rest = s[0][:-1], f'{s[1]}/{s[2]}', s[3:]
            if method == 'GET' and not rest:
                self.repo_info(repo_type, repo_id, 'main')
            elif method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
                self.repo_info(repo_type, repo_id, rest[1])
            elif method == 'GET' and len(rest) >= 2 and rest[0] == 'tree':
                self.list_tree(repo_type, repo_id, rest[1], '/'.join(rest[2:]))
            elif method == 'GET' and rest == ['refs']:
                self.list_refs(repo_type, repo_id)
            elif method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
                self.preupload(repo_type, repo_id, rest[1])
            elif method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
                self.commit(repo_type, repo_id, rest[1])
            else:
                return False
        else:
            return False
        return True

    # --- handlers -------------------------------------------------------------------------------------

    def create_repo(self) -> None:
        self._require_auth()
        body = self._json_body()
        name, org = body.get('name'), body.get('organization')
        repo_type = body.get('type') or 'model'
        if not name or repo_type not in REPO_TYPES:
            raise HubError(400, f'bad create request: {body}')
        repo_id = f'{org or "zoo-tester"}/{name}'
        private = bool(body.get('private')) or body.get('visibility') == 'private'
        url = self._repo_url(repo_type, repo_id)
        try:
            self.hub.create_repo(repo_id, repo_type, private)
        except HubError as e:
            self._send_json({'error': e.message, 'url': url}, e.status)
            return
        self._send_json({'url': url, 'name': repo_id, 'id': repo_id})

    def delete_repo(self) -> None:
        self._require_auth()
        body = self._json_body()
        repo_type = body.get('type') or 'model'
        repo_id = f'{body.get("organization") or "zoo-tester"}/{body.get("name")}'
        self.hub._get_repo(repo_type, repo_id, True)
        del self.hub.repos[(repo_type, repo_id)]
        self._send(200, b'')

    def validate_yaml(self) -> None:
        body = self._json_body()
        _, error = _front_matter(body.get('content', ''))
        if error:
            self._send_json({'errors': [{'message': error}], 'warnings': []}, 400)
        else:
            self._send_json({'errors': [], 'warnings': []})

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self.hub._get_repo(repo_type, repo_id, self.authorized)
        commit = self.hub._get_commit(repo, revision)
        with_blobs = self.query.get('blobs', ['false'])[0].lower() in ('1', 'true')
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {'rfilename': path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
            siblings.append(sibling)
        card = commit.files.get('README.md')
        card_data = _front_matter(card.data.decode('utf-8', 'replace'))[0] if card else None
        info = {
            '_id': hashlib.sha1(repo_id.encode()).hexdigest()[:24], 'id': repo_id, 'author': repo_id.split('/')[0],
            'sha': commit.oid, 'lastModified': commit.date, 'createdAt': repo.created_at,
            'private': repo.private, 'gated': False, 'disabled': False, 'downloads': 0, 'likes': 0,
            'tags': list((card_data or {}).get('tags') or []), 'siblings': siblings,
        }
        if repo_type == 'model':
            info['modelId'] = repo_id
            if card_data:
                info['cardData'] = card_data
                for key in ('library_name', 'pipeline_tag'):
                    if key in card_data:
                        info[key] = card_data[key]
        elif card_data:
            info['cardData'] = card_data
        self._send_json(info)

    def list_tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.hub._get_repo(repo_type, repo_id, self.authorized)
        commit = self.hub._get_commit(repo, revision)
        recursive = self.query.get('recursive', ['false'])[0].lower() in ('1', 'true')
        prefix = path.strip('/') + '/' if path.strip('/') else ''
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f'{path} does not exist on {revision}', 'EntryNotFound')
        entries: Dict[str, dict] = {}
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split('/')
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + '/'.join(parts[:depth])
                entries.setdefault(folder, {'type': 'directory', 'path': folder, 'size': 0,
                                            'oid': hashlib.sha1(folder.encode()).hexdigest()})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[file_path] = {'type': 'file', 'path': file_path, 'size': len(blob.data), 'oid': blob.oid}
        self._send_json(list(entries.values()))

    def list_refs(self, repo_type: str, repo_id: str) -> None:
        repo = self.hub._get_repo(repo_type, repo_id, self.authorized)
        branches = [{'name': n, 'ref': f'refs/heads/{n}', 'targetCommit': oid}
                    for n, oid in repo.branches.items() if not n.startswith('refs/')]
        self._send_json({'branches': branches, 'converts': [], 'tags': []})

    def preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_auth()
        repo = self.hub._get_repo(repo_type, repo_id, True)
        commit = self.hub._get_commit(repo, revision)
        files = []
        for f in self._json_body().get('files', []):
            entry = {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False}
            if f['path'] in commit.files:
                entry['oid'] = commit.files[f['path']].oid
            files.append(entry)
        self._send_json({'files': files, 'commitOid': commit.oid})

    def commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_auth()
        repo = self.hub._get_repo(repo_type, repo_id, True)
        head = self.hub._get_commit(repo, revision)
        if revision not in repo.branches:
            raise HubError(400, f'can only commit to a branch, not {revision}')
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, 'commit payload is not NDJSON')
        if not lines or lines[0].get('key') != 'header':
            raise HubError(400, 'commit payload must start with a header line')
        header = lines[0]['value']
        if header.get('parentCommit') and header['parentCommit'] != head.oid:
            raise HubError(412, f'A commit has happened since. Please refresh and try again ({revision} is '
                                f'at {head.oid}, not {header["parentCommit"]})')
        added, deleted = {}, []
        for line in lines[1:]:
            key, value = line.get('key'), line.get('value', {})
            if key == 'file':
                if value.get('encoding', 'base64') != 'base64':
                    raise HubError(400, f'unsupported encoding {value.get("encoding")}')
                added[value['path']] = base64.b64decode(value['content'])
            elif key in ('deletedFile', 'deletedFolder'):
                deleted.append((value['path'], key == 'deletedFolder'))
            else:  # lfsFile / copy: never asked for, since preupload answers "regular" for every file
                raise HubError(400, f'the fake Hub does not support {key!r} commit operations')
        branch = revision
        if self.query.get('create_pr', ['0'])[0] in ('1', 'true'):
            repo.num_prs += 1
            branch = f'refs/pr/{repo.num_prs}'
            repo.branches[branch] = head.oid
        commit = self.hub._commit(repo, branch, head.oid, header.get('summary') or 'Commit',
                                  header.get('description') or '', added, deleted)
        url = self._repo_url(repo_type, repo_id)
        response = {'commitUrl': f'{url}/commit/{commit.oid}', 'commitOid': commit.oid, 'success': True}
        if branch != revision:
            response['pullRequestUrl'] = f'{url}/discussions/{repo.num_prs}'
        self._send_json(response)

    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.hub._get_repo(repo_type, repo_id, self.authorized)
        commit = self.hub._get_commit(repo, revision)
        blob = commit.files.get(path)
        headers = {'X-Repo-Commit': commit.oid}
        if blob is None:
            self._send_json({'error': 'Entry not found'}, 404, {**headers, 'X-Error-Code': 'EntryNotFound',
                                                                'X-Error-Message': 'Entry not found'})
            return
        headers.update({'ETag': f'"{blob.oid}"', 'Accept-Ranges': 'bytes'})
        data, status = blob.data, 200
        match = re.match(r'^bytes=(\d*)-(\d*)$', self.headers.get('Range', '').strip())
        if match and self.command == 'GET' and (match.group(1) or match.group(2)):
            start, end = match.group(1), match.group(2)
            if start:
                first, last = int(start), int(end) if end else len(data) - 1
            else:  # suffix range: the last N bytes
                first, last = max(len(data) - int(end), 0), len(data) - 1
            last = min(last, len(data) - 1)
            if first > last:
                self._send(416, b'', headers={'Content-Range': f'bytes */{len(data)}'})
                return
            headers['Content-Range'] = f'bytes {first}-{last}/{len(data)}'
            data, status = data[first:last + 1], 206
        self._send(status, data, content_type='application/octet-stream', headers=headers)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = '' if repo_type == 'model' else f'{repo_type}s/'
        return f'{self.hub.endpoint}/{prefix}{repo_id}'


if __name__ == '__main__':
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args()
    with FakeHub(port=args.port) as hub:
        print(f'fake Hub at {hub.endpoint}; HF_ENDPOINT={hub.endpoint} (Ctrl-C stops it)', flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
