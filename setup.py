"""Package metadata comes from settings.ini (nbdev 2), the one place for it."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
reqs = cfg.get('requirements', '').split()
dev_reqs = cfg.get('dev_requirements', '').split()
peer_reqs = cfg.get('peers_requirements', '').split() # libraries the benchmarks compare against
scripts = [s.strip() for s in cfg.get('console_scripts', '').split('\n') if s.strip()]

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    author=cfg['author'], author_email=cfg['author_email'], license=cfg['license'],
    url=cfg['git_url'], packages=setuptools.find_packages(include=['workbench', 'workbench.*']),
    include_package_data=True, install_requires=reqs, extras_require={'dev': dev_reqs, 'peers': peer_reqs},
    python_requires='>=' + cfg['min_python'], long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown', zip_safe=False, keywords=cfg['keywords'].split(),
    classifiers=['Programming Language :: Python :: 3.11', 'License :: OSI Approved :: Apache Software License'],
    project_urls={'Documentation': cfg['doc_host'] + cfg['doc_baseurl']},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
